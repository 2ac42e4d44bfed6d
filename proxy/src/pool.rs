//! The request holder of one function: picks an instance with a free slot, or queues the request
//! until a slot frees, an instance turns ready, or the request's deadline passes.
//!
//! Acquiring on the fast path takes no lock: it reads the instance list from an `ArcSwap` and
//! takes a slot with a compare-and-swap. Only queueing and waking waiters take the queue's mutex.
//!
//! NB: no wake-up is lost. A waiter increments `waiting` and re-checks for a slot while holding
//! the queue lock; a release decrements the instance's counter and then reads `waiting`. Both use
//! sequentially consistent atomics, so either the waiter's re-check sees the freed slot or the
//! release sees the waiter and dispatches under the lock, after the waiter is in the queue.
//! Instance-list changes take the same path: store the list, then dispatch under the lock.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::instance::{Instance, InstanceState};

/// Instance lists up to this size are scanned in full to find the least loaded instance. Larger
/// lists sample two instances at random (power of two choices).
const FULL_SCAN_MAX: usize = 8;

/// Reason a request got no slot.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AcquireError {
    /// The wait queue already contains `limit` requests.
    #[error("wait queue is full ({limit} requests waiting)")]
    QueueFull { limit: usize },
    /// No slot became free within the queue budget.
    #[error("no instance had a free slot within the queue budget of {}ms", budget.as_millis())]
    BudgetExceeded {
        budget: Duration,
        /// The most recent start failure, if instances have been failing to start.
        last_start_failure: Option<String>,
    },
    /// Instances fail to start, and the scaler is backing off before the next attempt.
    #[error("instances fail to start: {reason}")]
    StartFailed { reason: String },
    /// The function was removed while the request waited.
    #[error("function was removed")]
    Removed,
    /// The proxy is shutting down and its grace period ran out.
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

/// A start failure the scaler reported, with the end of its back-off.
#[derive(Debug, Clone)]
pub struct StartFailure {
    pub reason: String,
    pub retry_at: Instant,
    /// Tells this failure apart from later ones with the same reason; unique in the process.
    pub id: u64,
}

/// Current load of a function, as the scaler reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Demand {
    pub in_flight: usize,
    pub queued: usize,
}

impl Demand {
    pub fn total(&self) -> usize {
        // Saturating: a mirror pool's figures come from a replica's report.
        self.in_flight.saturating_add(self.queued)
    }
}

type PermitReceiver = oneshot::Receiver<Result<Permit, AcquireError>>;

enum Enqueued {
    /// A slot freed up between the fast path and taking the lock.
    Slot(Arc<Instance>),
    Waiting(u64, PermitReceiver),
}

struct Waiter {
    id: u64,
    tx: oneshot::Sender<Result<Permit, AcquireError>>,
}

#[derive(Default)]
struct WaitQueue {
    next_id: u64,
    waiters: VecDeque<Waiter>,
}

/// Slots and wait queue of one function. Lives as long as the function exists, across routing
/// table swaps.
pub struct Pool {
    instances: ArcSwap<Vec<Arc<Instance>>>,
    queue: Mutex<WaitQueue>,
    /// Number of entries in `queue`, readable without the lock.
    waiting: AtomicUsize,
    in_flight: AtomicUsize,
    queue_limit: AtomicUsize,
    start_failure: ArcSwapOption<StartFailure>,
    /// Why the scaler cannot add capacity right now, for the queue-budget error message.
    capacity_note: ArcSwapOption<String>,
    /// Demand a proxy replica reported, on a control-plane mirror of the replica's pool. Such a
    /// pool takes no requests, so the scaler reads the replica's demand from it instead.
    reported: Mutex<Option<Demand>>,
    /// Instances taken out of routing since the last [`Pool::take_retired`], kept only on a
    /// proxy replica's pool (after [`Pool::track_retired`]), which reports them until idle.
    retired: Mutex<Option<Vec<Arc<Instance>>>>,
    demand_changed: Notify,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("instances", &self.instances.load().len())
            .field("demand", &self.demand())
            .finish()
    }
}

/// A taken slot on one instance. Dropping it returns the slot and wakes the next waiter.
pub struct Permit {
    pool: Arc<Pool>,
    instance: Arc<Instance>,
    /// How long the request waited in the queue, if it had to wait.
    queued_for: Option<Duration>,
    armed: bool,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("instance", &self.instance.id())
            .field("queued_for", &self.queued_for)
            .finish()
    }
}

impl Permit {
    pub fn instance(&self) -> &Arc<Instance> {
        &self.instance
    }

    pub fn queued_for(&self) -> Option<Duration> {
        self.queued_for
    }

    /// Returns the slot without dispatching waiters. Only for use under the queue lock.
    fn release_locked(mut self) {
        self.armed = false;
        self.pool.in_flight.fetch_sub(1, SeqCst);
        self.instance.release_slot();
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.pool.in_flight.fetch_sub(1, SeqCst);
        self.instance.release_slot();
        if self.pool.waiting.load(SeqCst) > 0 {
            self.pool.dispatch();
        }
    }
}

impl Pool {
    pub fn new(queue_limit: usize) -> Arc<Self> {
        Arc::new(Pool {
            instances: ArcSwap::from_pointee(Vec::new()),
            queue: Mutex::new(WaitQueue::default()),
            waiting: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            queue_limit: AtomicUsize::new(queue_limit),
            start_failure: ArcSwapOption::empty(),
            capacity_note: ArcSwapOption::empty(),
            reported: Mutex::new(None),
            retired: Mutex::new(None),
            demand_changed: Notify::new(),
        })
    }

    /// Starts keeping the instances taken out of routing, for [`Pool::take_retired`].
    pub fn track_retired(&self) {
        self.retired.lock().get_or_insert_with(Vec::new);
    }

    /// Returns the instances taken out of routing since the last call, and clears the list.
    pub fn take_retired(&self) -> Vec<Arc<Instance>> {
        self.retired
            .lock()
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    fn record_retired(&self, instances: &[Arc<Instance>]) {
        if let Some(retired) = self.retired.lock().as_mut() {
            retired.extend(instances.iter().cloned());
        }
    }

    /// Returns the requests in flight and queued: this pool's own, or on a mirror pool the
    /// last demand its replica reported.
    pub fn demand(&self) -> Demand {
        if let Some(reported) = *self.reported.lock() {
            return reported;
        }
        Demand {
            in_flight: self.in_flight.load(SeqCst),
            queued: self.waiting.load(SeqCst),
        }
    }

    /// Makes this pool a mirror of a proxy replica's pool and sets the demand the replica
    /// reported. Wakes the scaler when the demand changed.
    pub fn set_reported_demand(&self, demand: Demand) {
        let previous = self.reported.lock().replace(demand);
        if previous != Some(demand) {
            self.demand_changed.notify_one();
        }
    }

    /// Instances currently taking requests.
    pub fn instances(&self) -> Arc<Vec<Arc<Instance>>> {
        self.instances.load_full()
    }

    pub fn set_queue_limit(&self, limit: usize) {
        self.queue_limit.store(limit, SeqCst);
    }

    /// Resolves when demand may have grown (a request queued) or an instance failed. A signal
    /// sent while nobody waits is kept for the next call, so the scaler misses none.
    pub async fn demand_changed(&self) {
        self.demand_changed.notified().await;
    }

    /// Wakes the scaler, for example after an instance was found broken.
    pub fn notify_demand(&self) {
        self.demand_changed.notify_one();
    }

    /// Takes a slot, waiting up to `budget` in the queue when none is free.
    ///
    /// Cancel-safe: dropping the future removes the request from the queue, and a slot handed
    /// to it in the meantime is returned.
    pub async fn acquire(self: &Arc<Self>, budget: Duration) -> Result<Permit, AcquireError> {
        // Requests already waiting go first, so a newcomer takes the fast path only when none do.
        if self.waiting.load(SeqCst) == 0 {
            if let Some(instance) = self.take_slot() {
                return Ok(self.permit(instance, None));
            }
        }
        let enqueued_at = Instant::now();
        let (id, rx) = match self.enqueue()? {
            Enqueued::Slot(instance) => return Ok(self.permit(instance, None)),
            Enqueued::Waiting(id, rx) => (id, rx),
        };
        self.demand_changed.notify_one();

        let mut waiting = QueuedRequest {
            pool: self,
            id,
            rx: Some(rx),
        };
        let received = match waiting.rx.as_mut() {
            Some(rx) => tokio::time::timeout_at(enqueued_at + budget, rx).await,
            None => return Err(AcquireError::Removed),
        };
        match received {
            Ok(Ok(Ok(mut permit))) => {
                waiting.rx = None;
                permit.queued_for = Some(enqueued_at.elapsed());
                Ok(permit)
            }
            Ok(Ok(Err(error))) => {
                waiting.rx = None;
                Err(error)
            }
            Ok(Err(_)) => {
                waiting.rx = None;
                Err(AcquireError::Removed)
            }
            Err(_elapsed) => Err(AcquireError::BudgetExceeded {
                budget,
                last_start_failure: self.start_failure.load().as_ref().map(|f| f.reason.clone()),
            }),
        }
    }

    /// Registers a waiter, unless a slot is free after all, the queue is full, or starts are
    /// failing.
    fn enqueue(self: &Arc<Self>) -> Result<Enqueued, AcquireError> {
        let mut queue = self.queue.lock();
        self.waiting.fetch_add(1, SeqCst);
        // With waiters ahead, a freed slot is already being dispatched to them, so only an empty
        // queue needs the re-check that catches a release racing with this enqueue.
        if queue.waiters.is_empty() {
            if let Some(instance) = self.take_slot() {
                self.waiting.fetch_sub(1, SeqCst);
                return Ok(Enqueued::Slot(instance));
            }
        }
        if let Some(reason) = self.backing_off() {
            self.waiting.fetch_sub(1, SeqCst);
            return Err(AcquireError::StartFailed { reason });
        }
        let limit = self.queue_limit.load(SeqCst);
        if queue.waiters.len() >= limit {
            self.waiting.fetch_sub(1, SeqCst);
            return Err(AcquireError::QueueFull { limit });
        }
        let id = queue.next_id;
        queue.next_id += 1;
        let (tx, rx) = oneshot::channel();
        queue.waiters.push_back(Waiter { id, tx });
        Ok(Enqueued::Waiting(id, rx))
    }

    /// Returns the start failure to report at once, when no instance is routable and the scaler
    /// is in its back-off.
    fn backing_off(&self) -> Option<String> {
        let failure = self.start_failure.load();
        let failure = failure.as_ref()?;
        if failure.retry_at > Instant::now() && self.instances.load().is_empty() {
            Some(failure.reason.clone())
        } else {
            None
        }
    }

    fn permit(self: &Arc<Self>, instance: Arc<Instance>, queued_for: Option<Duration>) -> Permit {
        Permit {
            pool: Arc::clone(self),
            instance,
            queued_for,
            armed: true,
        }
    }

    /// Picks the least loaded ready instance with a free slot and takes the slot.
    fn take_slot(&self) -> Option<Arc<Instance>> {
        let instances = self.instances.load();
        let count = instances.len();
        if count == 0 {
            return None;
        }
        // A lost compare-and-swap race means another request took that slot; pick again.
        for _ in 0..4 {
            let candidate = if count <= FULL_SCAN_MAX {
                least_loaded(&instances, fastrand::usize(..count))
            } else {
                two_choices(&instances)
            }?;
            if candidate.try_take_slot() {
                self.in_flight.fetch_add(1, SeqCst);
                return Some(Arc::clone(candidate));
            }
        }
        None
    }

    /// Hands free slots to waiters in FIFO order.
    fn dispatch(self: &Arc<Self>) {
        let mut queue = self.queue.lock();
        while let Some(front) = queue.waiters.front() {
            if front.tx.is_closed() {
                queue.waiters.pop_front();
                self.waiting.fetch_sub(1, SeqCst);
                continue;
            }
            let Some(instance) = self.take_slot() else {
                break;
            };
            let Some(waiter) = queue.waiters.pop_front() else {
                break;
            };
            self.waiting.fetch_sub(1, SeqCst);
            if let Err(Ok(permit)) = waiter.tx.send(Ok(self.permit(instance, None))) {
                // The waiter gave up between the check and the send.
                permit.release_locked();
            }
        }
    }

    /// Removes a waiter that gave up. Returns false when it was already dispatched.
    fn remove_waiter(&self, id: u64) -> bool {
        let mut queue = self.queue.lock();
        match queue.waiters.iter().position(|w| w.id == id) {
            Some(index) => {
                queue.waiters.remove(index);
                self.waiting.fetch_sub(1, SeqCst);
                true
            }
            None => false,
        }
    }

    /// Makes a ready instance routable and wakes waiters.
    pub fn add_instance(self: &Arc<Self>, instance: Arc<Instance>) {
        self.instances.rcu(|current| {
            let mut next: Vec<Arc<Instance>> = current
                .iter()
                .filter(|i| i.id() != instance.id())
                .cloned()
                .collect();
            next.push(Arc::clone(&instance));
            next
        });
        self.start_failure.store(None);
        self.dispatch();
    }

    /// Takes an instance out of routing and marks it `state` (draining or failed). Requests in
    /// flight on it finish. Returns the instance if it was routable.
    pub fn remove_instance(&self, id: u64, state: InstanceState) -> Option<Arc<Instance>> {
        let mut removed = None;
        self.instances.rcu(|current| {
            removed = current.iter().find(|i| i.id() == id).cloned();
            current
                .iter()
                .filter(|i| i.id() != id)
                .cloned()
                .collect::<Vec<_>>()
        });
        if let Some(instance) = &removed {
            instance.set_state(state);
            self.record_retired(std::slice::from_ref(instance));
        }
        removed
    }

    /// Adds and removes instances in one swap of the instance list, for route sources that
    /// apply a batch of changes at once (the pod watcher in k8s mode). Removed instances keep
    /// their state; their in-flight requests finish. Wakes waiters when anything was added.
    pub fn update_instances(self: &Arc<Self>, added: &[Arc<Instance>], removed: &[u64]) {
        if added.is_empty() && removed.is_empty() {
            return;
        }
        let mut taken_out = Vec::new();
        self.instances.rcu(|current| {
            taken_out = current
                .iter()
                .filter(|i| removed.contains(&i.id()))
                .cloned()
                .collect();
            let mut next: Vec<Arc<Instance>> = current
                .iter()
                .filter(|i| !removed.contains(&i.id()) && !added.iter().any(|a| a.id() == i.id()))
                .cloned()
                .collect();
            next.extend(added.iter().cloned());
            next
        });
        self.record_retired(&taken_out);
        if !added.is_empty() {
            self.start_failure.store(None);
            self.dispatch();
        }
    }

    /// Changes every instance's slot count, then hands any new slots to waiters.
    pub fn set_capacity(self: &Arc<Self>, capacity: u32) {
        for instance in self.instances.load().iter() {
            instance.set_capacity(capacity);
        }
        self.dispatch();
    }

    /// Records a failed start. While no instance is routable, queued requests fail with the
    /// reason, and new ones fail at once until `retry_at`.
    pub fn record_start_failure(&self, reason: String, retry_at: Instant) {
        static NEXT_ID: AtomicUsize = AtomicUsize::new(1);
        self.start_failure.store(Some(Arc::new(StartFailure {
            id: NEXT_ID.fetch_add(1, SeqCst) as u64,
            reason: reason.clone(),
            retry_at,
        })));
        if self.instances.load().is_empty() {
            self.fail_waiters(&AcquireError::StartFailed { reason });
        }
    }

    /// Sets or clears the reason the scaler cannot add instances, such as an exhausted quota.
    pub fn set_capacity_note(&self, note: Option<String>) {
        self.capacity_note.store(note.map(Arc::new));
    }

    pub fn capacity_note(&self) -> Option<String> {
        self.capacity_note.load().as_deref().cloned()
    }

    /// Returns the last recorded start failure, if any.
    pub fn start_failure(&self) -> Option<StartFailure> {
        self.start_failure.load().as_deref().cloned()
    }

    /// Fails every queued request with `error`.
    pub fn fail_waiters(&self, error: &AcquireError) {
        let waiters: Vec<Waiter> = {
            let mut queue = self.queue.lock();
            let drained: Vec<Waiter> = queue.waiters.drain(..).collect();
            self.waiting.fetch_sub(drained.len(), SeqCst);
            drained
        };
        for waiter in waiters {
            let _ = waiter.tx.send(Err(error.clone()));
        }
    }
}

/// Scans every instance, starting at `start` so that ties rotate, and returns the one with the
/// fewest requests in flight among those with a free slot.
fn least_loaded(instances: &[Arc<Instance>], start: usize) -> Option<&Arc<Instance>> {
    let count = instances.len();
    let mut best: Option<(&Arc<Instance>, u32)> = None;
    for offset in 0..count {
        let instance = &instances[(start + offset) % count];
        let load = instance.in_flight();
        if load >= instance.capacity() || instance.state() != InstanceState::Ready {
            continue;
        }
        if best.is_none_or(|(_, best_load)| load < best_load) {
            best = Some((instance, load));
            if load == 0 {
                break;
            }
        }
    }
    best.map(|(instance, _)| instance)
}

/// Samples two instances and returns the less loaded one with a free slot. When both are full,
/// falls back to the first instance with a free slot from a random start, which costs a scan
/// only when the function is close to saturation.
fn two_choices(instances: &[Arc<Instance>]) -> Option<&Arc<Instance>> {
    let count = instances.len();
    let a = &instances[fastrand::usize(..count)];
    let b = &instances[fastrand::usize(..count)];
    let free =
        |i: &Arc<Instance>| i.in_flight() < i.capacity() && i.state() == InstanceState::Ready;
    match (free(a), free(b)) {
        (true, true) if b.in_flight() < a.in_flight() => Some(b),
        (true, _) => Some(a),
        (false, true) => Some(b),
        (false, false) => {
            let start = fastrand::usize(..count);
            (0..count)
                .map(|offset| &instances[(start + offset) % count])
                .find(|i| free(i))
        }
    }
}

/// A request in the wait queue. Dropping it before it got a slot removes it from the queue and
/// returns a slot that was handed to it in the meantime.
struct QueuedRequest<'a> {
    pool: &'a Arc<Pool>,
    id: u64,
    rx: Option<PermitReceiver>,
}

impl Drop for QueuedRequest<'_> {
    fn drop(&mut self) {
        let Some(mut rx) = self.rx.take() else {
            return;
        };
        if self.pool.remove_waiter(self.id) {
            return;
        }
        rx.close();
        // Dropping a permit here returns its slot and dispatches, without holding the lock.
        if let Ok(Ok(permit)) = rx.try_recv() {
            drop(permit);
        }
    }
}
