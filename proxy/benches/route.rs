//! The routing table: `Router::lookup` hits and misses on tables of 1k and 100k functions, and
//! the cost of changing a 100k-function table. `Router::replace` builds the table into an empty
//! router and over a table whose functions each have ten instances. `upsert` and `remove` add and
//! remove one function.
//!
//! Run with `cargo bench -p fngate-proxy --bench route`. The Prometheus recorder is installed, as
//! in the `fngate` binary, so per-function metric handles cost what they cost in production.
//! Wall-clock numbers move with whatever else the machine runs, so compare results of one run
//! with each other, not across runs.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use fngate_proxy::{FunctionKey, FunctionKind, FunctionSettings, Instance, Router};

/// Functions are spread evenly over this many namespaces.
const NAMESPACES: usize = 10;

fn settings() -> FunctionSettings {
    FunctionSettings {
        kind: FunctionKind::Web,
        memory_mb: 128,
        timeout: Duration::from_secs(3),
        queue_budget: Duration::from_secs(1),
        queue_limit: 100,
        max_body_bytes: 1 << 20,
        concurrency: 4,
    }
}

fn key(index: usize) -> FunctionKey {
    FunctionKey {
        namespace: format!("ns-{}", index % NAMESPACES),
        name: format!("fn-{index:06}"),
        qualifier: "$LATEST".to_owned(),
    }
}

fn entries(count: usize) -> Vec<(FunctionKey, FunctionSettings)> {
    (0..count).map(|i| (key(i), settings())).collect()
}

fn router_with(count: usize) -> Router {
    let router = Router::new();
    router.replace(entries(count));
    router
}

fn lookup(c: &mut Criterion) {
    fngate_proxy::metrics::install_recorder();
    let mut group = c.benchmark_group("router/lookup");
    for count in [1_000, 100_000] {
        let router = router_with(count);
        let hit = key(count / 2);
        group.bench_with_input(BenchmarkId::new("hit", count), &router, |b, router| {
            b.iter(|| {
                router
                    .lookup(
                        black_box(&hit.namespace),
                        black_box(&hit.name),
                        black_box(&hit.qualifier),
                    )
                    .expect("function exists")
            })
        });
        // The namespace exists, the function does not: the common miss of a mistyped URL.
        let miss = FunctionKey {
            name: "fn-missing".to_owned(),
            ..hit.clone()
        };
        group.bench_with_input(BenchmarkId::new("miss", count), &router, |b, router| {
            b.iter(|| {
                router
                    .lookup(
                        black_box(&miss.namespace),
                        black_box(&miss.name),
                        black_box(&miss.qualifier),
                    )
                    .expect_err("function does not exist")
            })
        });
    }
    group.finish();
}

/// Building a 100k-function table: every function new, and every function kept (the shape of a
/// route source that resends its full view), with ten instances in each function's pool.
fn replace(c: &mut Criterion) {
    const FUNCTIONS: usize = 100_000;
    const INSTANCES: u64 = 10;
    fngate_proxy::metrics::install_recorder();
    let mut group = c.benchmark_group("router/replace");
    group.sample_size(10);

    group.bench_function(BenchmarkId::new("new_functions", FUNCTIONS), |b| {
        b.iter_batched(
            || (Router::new(), entries(FUNCTIONS)),
            |(router, entries)| {
                router.replace(entries);
                router
            },
            BatchSize::PerIteration,
        )
    });

    let router = router_with(FUNCTIONS);
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("valid address");
    for function in router.table().functions() {
        for id in 0..INSTANCES {
            let instance = Instance::new(id, addr, 4, Duration::ZERO);
            function.pool.add_instance(Arc::new(instance));
        }
    }
    group.bench_function(BenchmarkId::new("kept_functions", FUNCTIONS), |b| {
        b.iter_batched(
            || entries(FUNCTIONS),
            |entries| router.replace(entries),
            BatchSize::PerIteration,
        )
    });
    group.finish();

    // `upsert` and `remove` copy the whole table to change one entry, so their cost grows with
    // the table like a rebuild's does.
    let mut group = c.benchmark_group("router/single_function");
    group.sample_size(10);
    let extra = key(FUNCTIONS);
    group.bench_function(BenchmarkId::new("upsert_then_remove", FUNCTIONS), |b| {
        b.iter(|| {
            router.upsert(extra.clone(), settings());
            router.remove(&extra).expect("the function was just added")
        })
    });
    group.finish();
}

criterion_group!(benches, lookup, replace);
criterion_main!(benches);
