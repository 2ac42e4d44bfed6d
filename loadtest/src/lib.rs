//! fngate's benchmark harness. Each scenario starts what it needs on loopback and runs bounded in
//! time and count. It stops what it started, also on error, because child processes are held by
//! guards that stop them when dropped. It prints markdown tables and writes JSON, markdown and
//! SVG plots under the output directory.

pub mod burst;
pub mod churn;
pub mod client;
pub mod cold;
pub mod fngate;
pub mod oha;
pub mod plot;
pub mod procs;
pub mod proxies;
pub mod report;
pub mod settings;
pub mod stats;
pub mod table_scale;
pub mod upstream;
pub mod warm;
mod warm_report;
