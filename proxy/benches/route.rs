//! The routing table at 1k, 10k and 100k functions: `Router::lookup` hits and misses, and the
//! cost of one change. `upsert` adds one new function, `remove` removes one, and `replace`
//! resends the same set of functions over a table whose functions each have ten instances (every
//! pool carries over). `replace` also builds a table into an empty router.
//!
//! Run with `cargo bench -p fngate-proxy --bench route`. The Prometheus recorder is installed, as
//! in the `fngate` binary, so per-function metric handles cost what they cost in production.
//! Wall-clock numbers move with whatever else the machine runs, so compare results of one run
//! with each other, not across runs.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use fngate_proxy::{FunctionKey, FunctionKind, FunctionSettings, Instance, Router};

/// Functions are spread evenly over this many namespaces.
const NAMESPACES: usize = 10;

/// Table sizes, in functions.
const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// Instances added to each function's pool before `replace` is timed.
const INSTANCES: u64 = 10;

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
    for count in SIZES {
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

/// Times one change to a table of each size. Each timed `upsert` adds a function that is removed
/// again outside the timed part, and each timed `remove` removes a function that was added outside
/// it, so the table keeps its size. The times include dropping the replaced snapshot, which the
/// caller pays for too.
fn single_change(c: &mut Criterion) {
    fngate_proxy::metrics::install_recorder();
    let mut group = c.benchmark_group("router/change");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for count in SIZES {
        let router = router_with(count);
        // A new name in an existing namespace.
        let extra = key(count);

        group.bench_function(BenchmarkId::new("upsert", count), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    black_box(router.upsert(extra.clone(), settings()));
                    timed += started.elapsed();
                    router.remove(&extra).expect("the function was just added");
                }
                timed
            })
        });

        group.bench_function(BenchmarkId::new("remove", count), |b| {
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    router.upsert(extra.clone(), settings());
                    let started = Instant::now();
                    let removed = router.remove(&extra).expect("the function was just added");
                    timed += started.elapsed();
                    black_box(removed);
                }
                timed
            })
        });
    }
    group.finish();
}

/// Times `Router::replace` at each size: into an empty router (every function new), and with the
/// same functions as the current table (the shape of a route source that resends its full view),
/// with ten instances in each function's pool. Building the input list is not timed, but dropping
/// it inside `Router::replace` is.
fn replace(c: &mut Criterion) {
    fngate_proxy::metrics::install_recorder();
    let mut group = c.benchmark_group("router/replace");
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for count in SIZES {
        group.bench_function(BenchmarkId::new("new_functions", count), |b| {
            b.iter_batched(
                || (Router::new(), entries(count)),
                |(router, entries)| {
                    router.replace(entries);
                    router
                },
                BatchSize::PerIteration,
            )
        });

        let router = router_with(count);
        let addr: SocketAddr = "127.0.0.1:9".parse().expect("valid address");
        for function in router.table().functions() {
            for id in 0..INSTANCES {
                let instance = Instance::new(id, addr, 4, Duration::ZERO);
                function.pool.add_instance(Arc::new(instance));
            }
        }
        group.bench_function(BenchmarkId::new("same_functions", count), |b| {
            b.iter_batched(
                || entries(count),
                |entries| router.replace(entries),
                BatchSize::PerIteration,
            )
        });
    }
    group.finish();
}

criterion_group!(benches, lookup, single_change, replace);
criterion_main!(benches);
