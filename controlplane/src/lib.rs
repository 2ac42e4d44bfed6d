//! fngate's control plane: the function and namespace store with its HTTP API, the scaler, and
//! the instance backends (local processes in default mode).

pub mod api;
pub mod backend;
pub mod code;
pub mod config;
pub mod error;
pub mod k8s;
pub mod local;
pub mod model;
pub mod platform;
pub mod quota;
pub mod scaler;
pub mod validate;
