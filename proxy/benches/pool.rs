//! Slot acquisition in [`Pool`]: the lock-free fast path with one and ten instances, the same path
//! with two threads contending, and the slow path where a request queues and a release wakes it.
//!
//! Run with `cargo bench -p fngate-proxy --bench pool`. Wall-clock numbers move with whatever
//! else the machine runs, so compare results of one run with each other, not across runs.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::{Arc, Barrier};
use std::task::Poll;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use fngate_proxy::{Instance, Pool};
use futures_util::FutureExt;

const BUDGET: Duration = Duration::from_secs(1);

fn pool_with(instances: u64, capacity: u32) -> Arc<Pool> {
    let pool = Pool::new(1024);
    let addr: SocketAddr = "127.0.0.1:9".parse().expect("valid address");
    for id in 0..instances {
        pool.add_instance(Arc::new(Instance::new(id, addr, capacity, Duration::ZERO)));
    }
    pool
}

/// Takes a slot on the fast path, which completes on the first poll, and drops it at once.
fn acquire_release(pool: &Arc<Pool>) {
    let permit = pool
        .acquire(BUDGET)
        .now_or_never()
        .expect("fast path completes on the first poll")
        .expect("a slot is free");
    drop(permit);
}

fn uncontended(c: &mut Criterion) {
    let mut group = c.benchmark_group("pool/uncontended");
    for instances in [1, 10] {
        let pool = pool_with(instances, 4);
        group.bench_with_input(
            BenchmarkId::new("acquire_release", instances),
            &pool,
            |b, pool| b.iter(|| acquire_release(pool)),
        );
    }
    group.finish();
}

/// Two threads take and return slots on one pool. Reports the time per acquire and release
/// pair on one thread, so the ratio to the uncontended case is the cost of sharing.
fn contended(c: &mut Criterion) {
    const THREADS: usize = 2;
    let mut group = c.benchmark_group("pool/contended");
    for instances in [1, 10] {
        // Each thread takes at most one slot at a time, so the fast path never runs out of slots.
        let pool = pool_with(instances, THREADS as u32);
        group.bench_with_input(
            BenchmarkId::new("acquire_release_2_threads", instances),
            &pool,
            |b, pool| {
                b.iter_custom(|iters| {
                    let barrier = Barrier::new(THREADS);
                    std::thread::scope(|scope| {
                        let workers: Vec<_> = (0..THREADS)
                            .map(|_| {
                                scope.spawn(|| {
                                    barrier.wait();
                                    let start = Instant::now();
                                    for _ in 0..iters {
                                        acquire_release(pool);
                                    }
                                    start.elapsed()
                                })
                            })
                            .collect();
                        workers
                            .into_iter()
                            .map(|worker| worker.join().expect("worker thread panicked"))
                            .max()
                            .unwrap_or_default()
                    })
                })
            },
        );
    }
    group.finish();
}

/// Measures the slow path: with the only slot taken, a second request queues, and releasing the
/// slot hands it to the waiter through the queue.
fn queued(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("tokio runtime");
    let pool = pool_with(1, 1);
    c.bench_function("pool/queued/acquire_woken_by_release", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    queue_and_wake(&pool).await;
                }
                start.elapsed()
            })
        })
    });
}

async fn queue_and_wake(pool: &Arc<Pool>) {
    let holder = pool.acquire(BUDGET).await.expect("the only slot is free");
    let mut waiter = pin!(pool.acquire(BUDGET));
    let first_poll = std::future::poll_fn(|cx| Poll::Ready(waiter.as_mut().poll(cx))).await;
    assert!(first_poll.is_pending(), "the second request did not queue");
    drop(holder);
    let permit = waiter.await.expect("the release hands the slot over");
    assert!(permit.queued_for().is_some());
}

criterion_group!(benches, uncontended, contended, queued);
criterion_main!(benches);
