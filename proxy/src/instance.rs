//! One routable runtime instance as the proxy sees it: its address, its concurrency slots and its
//! idle upstream connections. The slot counters live here, outside any routing snapshot, so a
//! snapshot swap that keeps the same `Arc<Instance>` never loses an in-flight count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::SeqCst};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Notify;

use crate::upstream::ConnPool;

/// Lifecycle of an instance in the routing table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum InstanceState {
    /// Takes new requests.
    Ready = 0,
    /// Finishes its in-flight requests and takes no new ones.
    Draining = 1,
    /// Found unreachable or broken; takes no new requests and is waiting to be stopped.
    Failed = 2,
}

impl InstanceState {
    fn from_u8(value: u8) -> Self {
        match value {
            0 => InstanceState::Ready,
            1 => InstanceState::Draining,
            _ => InstanceState::Failed,
        }
    }
}

/// A runtime instance with its slots. Identified by an id its backend never reuses.
#[derive(Debug)]
pub struct Instance {
    id: u64,
    addr: SocketAddr,
    capacity: AtomicU32,
    in_flight: AtomicU32,
    state: AtomicU8,
    boot_time: Duration,
    served_first: AtomicBool,
    /// Milliseconds since [`clock_origin`] when a request last finished here.
    last_released_ms: AtomicU64,
    idle: Notify,
    /// On a control-plane mirror: the replica reported that it no longer routes here.
    unrouted: AtomicBool,
    pub(crate) conns: ConnPool,
}

impl Instance {
    /// Creates a ready instance with `capacity` slots. `boot_time` is how long it took to start,
    /// reported to the first request it serves.
    pub fn new(id: u64, addr: SocketAddr, capacity: u32, boot_time: Duration) -> Self {
        Instance {
            id,
            addr,
            capacity: AtomicU32::new(capacity.max(1)),
            in_flight: AtomicU32::new(0),
            state: AtomicU8::new(InstanceState::Ready as u8),
            boot_time,
            served_first: AtomicBool::new(false),
            last_released_ms: AtomicU64::new(now_ms()),
            idle: Notify::new(),
            unrouted: AtomicBool::new(false),
            conns: ConnPool::new(capacity.max(1) as usize),
        }
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn capacity(&self) -> u32 {
        self.capacity.load(SeqCst)
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(SeqCst)
    }

    pub fn state(&self) -> InstanceState {
        InstanceState::from_u8(self.state.load(SeqCst))
    }

    pub fn boot_time(&self) -> Duration {
        self.boot_time
    }

    /// Time since a request last finished on this instance, or since it was created.
    pub fn idle_for(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.last_released_ms.load(SeqCst)))
    }

    /// Changes the number of slots. Requests above a lowered capacity finish normally.
    pub fn set_capacity(&self, capacity: u32) {
        self.capacity.store(capacity.max(1), SeqCst);
    }

    /// Stops new requests from being routed here; in-flight ones finish.
    pub fn set_state(&self, state: InstanceState) {
        self.state.store(state as u8, SeqCst);
        if state != InstanceState::Ready {
            self.conns.clear();
            if self.in_flight() == 0 {
                self.idle.notify_waiters();
            }
        }
    }

    /// Sets the load a proxy replica reported for this instance, on a control-plane mirror that
    /// takes no requests itself: the requests in flight, and the time since the last one
    /// finished. Wakes a drain waiting for the instance to go idle.
    pub fn set_reported_usage(&self, in_flight: u32, idle_for: Duration) {
        self.in_flight.store(in_flight, SeqCst);
        let idle_ms = u64::try_from(idle_for.as_millis()).unwrap_or(u64::MAX);
        self.last_released_ms
            .store(now_ms().saturating_sub(idle_ms), SeqCst);
        if in_flight == 0 {
            self.idle.notify_waiters();
        }
    }

    /// Records, on a control-plane mirror, that the replica no longer routes requests here.
    /// Wakes [`Instance::wait_released`] once nothing is in flight either.
    pub fn set_reported_unrouted(&self) {
        self.unrouted.store(true, SeqCst);
        self.idle.notify_waiters();
    }

    /// Waits, on a control-plane mirror, until the replica reported that it no longer routes
    /// here and has no request in flight. The mirror's own in-flight count may be a report
    /// old, so [`Instance::wait_idle`] alone could stop a pod the replica still uses.
    pub async fn wait_released(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.unrouted.load(SeqCst) && self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Waits until no request is in flight. Meant for draining instances.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Takes a slot if one is free and the instance is ready.
    pub(crate) fn try_take_slot(&self) -> bool {
        let capacity = self.capacity.load(SeqCst);
        let taken = self
            .in_flight
            .fetch_update(SeqCst, SeqCst, |n| (n < capacity).then_some(n + 1))
            .is_ok();
        if !taken {
            return false;
        }
        // NB: the state is read after the slot is taken. A drainer stores the state first and
        // reads `in_flight` after, so either this sees the new state and backs off, or the
        // drainer sees this slot and waits for it.
        if self.state() != InstanceState::Ready {
            self.release_slot();
            return false;
        }
        true
    }

    /// Returns a slot. Wakes drainers once the instance is idle.
    pub(crate) fn release_slot(&self) {
        let before = self.in_flight.fetch_sub(1, SeqCst);
        self.last_released_ms.store(now_ms(), SeqCst);
        if before == 1 && self.state() != InstanceState::Ready {
            self.idle.notify_waiters();
        }
    }

    /// Marks the first request served, returning true only for the first caller.
    pub(crate) fn take_first_use(&self) -> bool {
        // The load keeps the common case (already served) free of a contended write.
        !self.served_first.load(SeqCst) && !self.served_first.swap(true, SeqCst)
    }
}

/// Process-wide origin for the coarse millisecond clock used for idle tracking.
fn clock_origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(clock_origin().elapsed().as_millis()).unwrap_or(u64::MAX)
}
