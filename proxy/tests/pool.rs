//! Tests of the slot and wait-queue primitive, on tokio's paused clock where deadlines matter.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use fngate_proxy::{AcquireError, Demand, Instance, InstanceState, Pool};
use proptest::prelude::*;
use tokio::time::Instant;

fn instance(id: u64, capacity: u32) -> Arc<Instance> {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    Arc::new(Instance::new(id, addr, capacity, Duration::from_millis(5)))
}

const BUDGET: Duration = Duration::from_secs(10);

#[tokio::test(start_paused = true)]
async fn fast_path_fills_least_loaded_first() {
    let pool = Pool::new(10);
    let (a, b) = (instance(1, 2), instance(2, 2));
    pool.add_instance(Arc::clone(&a));
    pool.add_instance(Arc::clone(&b));

    let first = pool.acquire(BUDGET).await.unwrap();
    let second = pool.acquire(BUDGET).await.unwrap();
    assert_ne!(
        first.instance().id(),
        second.instance().id(),
        "second request went to the busier instance"
    );
    let _third = pool.acquire(BUDGET).await.unwrap();
    let _fourth = pool.acquire(BUDGET).await.unwrap();
    assert_eq!(a.in_flight(), 2);
    assert_eq!(b.in_flight(), 2);
    assert_eq!(pool.demand().in_flight, 4);
}

#[tokio::test(start_paused = true)]
async fn ties_do_not_always_pick_same_instance() {
    let pool = Pool::new(10);
    let instances: Vec<_> = (1..=3).map(|id| instance(id, 1)).collect();
    for i in &instances {
        pool.add_instance(Arc::clone(i));
    }
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let permit = pool.acquire(BUDGET).await.unwrap();
        seen.insert(permit.instance().id());
    }
    assert_eq!(seen.len(), 3, "only instances {seen:?} were ever picked");
}

#[tokio::test(start_paused = true)]
async fn waiters_served_in_fifo_order() {
    let pool = Pool::new(10);
    pool.add_instance(instance(1, 1));
    let held = pool.acquire(BUDGET).await.unwrap();

    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for n in 0..3 {
        let task_pool = Arc::clone(&pool);
        let order = Arc::clone(&order);
        tasks.push(tokio::spawn(async move {
            let permit = task_pool.acquire(BUDGET).await.unwrap();
            order.lock().push(n);
            drop(permit);
        }));
        // Let the task reach the queue before spawning the next one.
        while pool.demand().queued < n + 1 {
            tokio::task::yield_now().await;
        }
    }
    drop(held);
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(*order.lock(), vec![0, 1, 2]);
    assert_eq!(pool.demand(), Default::default());
}

#[tokio::test(start_paused = true)]
async fn budget_exceeded_after_deadline() {
    let pool = Pool::new(10);
    let started = Instant::now();
    let error = pool.acquire(Duration::from_secs(2)).await.unwrap_err();
    assert!(
        matches!(error, AcquireError::BudgetExceeded { .. }),
        "{error:?}"
    );
    assert_eq!(started.elapsed(), Duration::from_secs(2));
    assert_eq!(pool.demand().queued, 0);
}

#[tokio::test(start_paused = true)]
async fn queue_full_rejected_at_once() {
    let pool = Pool::new(2);
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let pool = Arc::clone(&pool);
            tokio::spawn(async move { pool.acquire(BUDGET).await.map(drop) })
        })
        .collect();
    while pool.demand().queued < 2 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    let error = pool.acquire(BUDGET).await.unwrap_err();
    assert_eq!(error, AcquireError::QueueFull { limit: 2 });
    assert_eq!(started.elapsed(), Duration::ZERO);
    pool.add_instance(instance(1, 2));
    for waiter in waiters {
        waiter.await.unwrap().unwrap();
    }
}

#[tokio::test(start_paused = true)]
async fn new_instance_wakes_waiter() {
    let pool = Pool::new(10);
    let waiter = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move { pool.acquire(BUDGET).await.map(|p| p.instance().id()) })
    };
    while pool.demand().queued == 0 {
        tokio::task::yield_now().await;
    }
    pool.add_instance(instance(7, 1));
    assert_eq!(waiter.await.unwrap().unwrap(), 7);
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiter_leaves_queue() {
    let pool = Pool::new(10);
    let inst = instance(1, 1);
    pool.add_instance(Arc::clone(&inst));
    let held = pool.acquire(BUDGET).await.unwrap();

    let waiter = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move { pool.acquire(BUDGET).await.map(drop) })
    };
    while pool.demand().queued == 0 {
        tokio::task::yield_now().await;
    }
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(pool.demand().queued, 0);

    drop(held);
    assert_eq!(inst.in_flight(), 0, "slot leaked to the cancelled waiter");
    assert_eq!(pool.demand().in_flight, 0);
    let again = pool.acquire(BUDGET).await.unwrap();
    assert_eq!(again.instance().id(), 1);
}

#[tokio::test(start_paused = true)]
async fn start_failure_fails_waiters_then_fast() {
    let pool = Pool::new(10);
    let waiter = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move { pool.acquire(BUDGET).await.map(drop) })
    };
    while pool.demand().queued == 0 {
        tokio::task::yield_now().await;
    }
    let retry_at = Instant::now() + Duration::from_secs(1);
    pool.record_start_failure("bootstrap exited with exit status 1".into(), retry_at);
    let error = waiter.await.unwrap().unwrap_err();
    assert_eq!(
        error,
        AcquireError::StartFailed {
            reason: "bootstrap exited with exit status 1".into()
        }
    );

    let started = Instant::now();
    let error = pool.acquire(BUDGET).await.unwrap_err();
    assert!(matches!(error, AcquireError::StartFailed { .. }));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "request waited during back-off"
    );

    tokio::time::advance(Duration::from_secs(1)).await;
    let error = pool.acquire(Duration::from_millis(100)).await.unwrap_err();
    match error {
        AcquireError::BudgetExceeded {
            last_start_failure, ..
        } => {
            assert_eq!(
                last_start_failure.as_deref(),
                Some("bootstrap exited with exit status 1")
            )
        }
        other => panic!("expected BudgetExceeded after back-off, got {other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn draining_keeps_in_flight_until_released() {
    let pool = Pool::new(10);
    let inst = instance(1, 2);
    pool.add_instance(Arc::clone(&inst));
    let permit = pool.acquire(BUDGET).await.unwrap();

    pool.remove_instance(1, InstanceState::Draining);
    assert_eq!(inst.in_flight(), 1);
    assert!(pool.instances().is_empty());

    let idle = {
        let inst = Arc::clone(&inst);
        tokio::spawn(async move { inst.wait_idle().await })
    };
    tokio::task::yield_now().await;
    assert!(
        !idle.is_finished(),
        "drain finished with a request in flight"
    );
    drop(permit);
    idle.await.unwrap();
    assert_eq!(pool.demand().in_flight, 0);
}

#[tokio::test(start_paused = true)]
async fn reported_demand_wakes_scaler() {
    let pool = Pool::new(10);
    let demand = Demand {
        in_flight: 3,
        queued: 2,
    };
    pool.set_reported_demand(demand);
    tokio::time::timeout(Duration::from_secs(1), pool.demand_changed())
        .await
        .expect("a new reported demand did not wake the scaler");
    assert_eq!(pool.demand(), demand);

    // The same report again is no change.
    pool.set_reported_demand(demand);
    let woken = tokio::time::timeout(Duration::from_secs(1), pool.demand_changed()).await;
    assert!(woken.is_err(), "an unchanged report woke the scaler");

    pool.set_reported_demand(Demand::default());
    tokio::time::timeout(Duration::from_secs(1), pool.demand_changed())
        .await
        .expect("a drop to zero did not wake the scaler");
    assert_eq!(pool.demand().total(), 0);
}

#[tokio::test(start_paused = true)]
async fn reported_usage_drives_drain_and_idle_time() {
    let inst = instance(1, 4);
    inst.set_reported_usage(2, Duration::ZERO);
    inst.set_state(InstanceState::Draining);
    let idle = {
        let inst = Arc::clone(&inst);
        tokio::spawn(async move { inst.wait_idle().await })
    };
    tokio::task::yield_now().await;
    assert!(
        !idle.is_finished(),
        "drain finished while the replica reported requests in flight"
    );
    assert_eq!(inst.in_flight(), 2);

    tokio::time::advance(Duration::from_secs(30)).await;
    inst.set_reported_usage(0, Duration::from_secs(20));
    tokio::time::timeout(Duration::from_secs(1), idle)
        .await
        .expect("a report of no requests in flight did not end the drain")
        .unwrap();
    let idle_for = inst.idle_for();
    assert!(
        idle_for >= Duration::from_secs(20) && idle_for < Duration::from_secs(21),
        "idle for {idle_for:?}, reported 20 s"
    );
}

#[tokio::test(start_paused = true)]
async fn removed_function_fails_waiters() {
    let pool = Pool::new(10);
    let waiter = {
        let pool = Arc::clone(&pool);
        tokio::spawn(async move { pool.acquire(BUDGET).await.map(drop) })
    };
    while pool.demand().queued == 0 {
        tokio::task::yield_now().await;
    }
    pool.fail_waiters(&AcquireError::Removed);
    assert_eq!(waiter.await.unwrap().unwrap_err(), AcquireError::Removed);
    assert_eq!(pool.demand().queued, 0);
}

/// Many tasks on a multi-thread runtime contend for two single-slot instances. The test counts
/// requests inside each instance itself, so an over-admission shows up as a count above one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contended_slots_never_overcommit() {
    let pool = Pool::new(1000);
    let instances = [instance(1, 1), instance(2, 1)];
    for i in &instances {
        pool.add_instance(Arc::clone(i));
    }
    let inside: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let violations = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let pool = Arc::clone(&pool);
            let inside = Arc::clone(&inside);
            let violations = Arc::clone(&violations);
            tokio::spawn(async move {
                for _ in 0..500 {
                    let permit = pool.acquire(Duration::from_secs(60)).await.unwrap();
                    let id = permit.instance().id() as usize;
                    if inside[id].fetch_add(1, SeqCst) != 0 {
                        violations.fetch_add(1, SeqCst);
                    }
                    tokio::task::yield_now().await;
                    inside[id].fetch_sub(1, SeqCst);
                    drop(permit);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    assert_eq!(violations.load(SeqCst), 0);
    assert_eq!(pool.demand(), Default::default());
    assert!(instances.iter().all(|i| i.in_flight() == 0));
}

#[derive(Debug, Clone)]
enum Op {
    Acquire,
    Release(usize),
    AddInstance(u32),
    RemoveInstance(usize),
    CancelWaiter,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => Just(Op::Acquire),
        3 => (0usize..16).prop_map(Op::Release),
        1 => (1u32..4).prop_map(Op::AddInstance),
        1 => (0usize..8).prop_map(Op::RemoveInstance),
        1 => Just(Op::CancelWaiter),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// After any sequence of operations: no instance holds more requests than its capacity, the
    /// pool's counters match the permits held and the waiters alive, and every waiter gets a slot
    /// once enough capacity exists.
    #[test]
    fn slot_accounting_holds(ops in proptest::collection::vec(op(), 1..60)) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(check_ops(ops));
    }
}

async fn check_ops(ops: Vec<Op>) {
    let pool = Pool::new(1000);
    let mut instances: Vec<Arc<Instance>> = Vec::new();
    let mut permits = Vec::new();
    let mut waiters: Vec<
        tokio::task::JoinHandle<Result<fngate_proxy::pool::Permit, AcquireError>>,
    > = Vec::new();
    let mut next_id = 1;
    for op in ops {
        match op {
            Op::Acquire => {
                let pool = Arc::clone(&pool);
                waiters.push(tokio::spawn(async move { pool.acquire(BUDGET).await }));
            }
            Op::Release(index) if !permits.is_empty() => {
                permits.swap_remove(index % permits.len());
            }
            Op::Release(_) => {}
            Op::AddInstance(capacity) => {
                let inst = instance(next_id, capacity);
                next_id += 1;
                instances.push(Arc::clone(&inst));
                pool.add_instance(inst);
            }
            Op::RemoveInstance(index) if !instances.is_empty() => {
                let inst = &instances[index % instances.len()];
                pool.remove_instance(inst.id(), InstanceState::Draining);
            }
            Op::RemoveInstance(_) => {}
            Op::CancelWaiter => {
                if let Some(waiter) = waiters.pop() {
                    waiter.abort();
                    if let Ok(Ok(permit)) = waiter.await {
                        permits.push(permit);
                    }
                }
            }
        }
        for _ in 0..4 {
            tokio::task::yield_now().await;
        }
        let mut still_waiting = Vec::new();
        for waiter in waiters.drain(..) {
            if waiter.is_finished() {
                permits.push(waiter.await.unwrap().unwrap());
            } else {
                still_waiting.push(waiter);
            }
        }
        waiters = still_waiting;

        for inst in &instances {
            assert!(
                inst.in_flight() <= inst.capacity(),
                "instance {} over capacity",
                inst.id()
            );
        }
        let held: u32 = instances.iter().map(|i| i.in_flight()).sum();
        assert_eq!(held as usize, permits.len());
        assert_eq!(pool.demand().in_flight, permits.len());
        assert_eq!(pool.demand().queued, waiters.len());
        let free: u32 = pool
            .instances()
            .iter()
            .map(|i| i.capacity() - i.in_flight())
            .sum();
        if !waiters.is_empty() {
            assert_eq!(
                free,
                0,
                "a slot is free while {} requests wait",
                waiters.len()
            );
        }
    }
    permits.clear();
    for waiter in waiters {
        waiter.abort();
    }
}
