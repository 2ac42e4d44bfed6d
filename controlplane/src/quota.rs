//! A namespace's memory quota: the summed memory of its running and starting instances may not
//! exceed the limit. Scalers reserve before starting an instance and release after it stopped.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// Memory quota of one namespace, in MB. A limit of zero means no quota.
#[derive(Debug, Default)]
pub struct Quota {
    limit_mb: AtomicU64,
    used_mb: Mutex<u64>,
    released: Notify,
}

impl Quota {
    pub fn new(limit_mb: u64) -> Self {
        Quota {
            limit_mb: AtomicU64::new(limit_mb),
            ..Default::default()
        }
    }

    pub fn set_limit(&self, limit_mb: u64) {
        self.limit_mb.store(limit_mb, SeqCst);
        self.released.notify_waiters();
    }

    pub fn limit_mb(&self) -> u64 {
        self.limit_mb.load(SeqCst)
    }

    pub fn used_mb(&self) -> u64 {
        *self.used_mb.lock()
    }

    /// Reserves `mb` if the quota allows it.
    pub fn try_reserve(&self, mb: u64) -> bool {
        let limit = self.limit_mb();
        let mut used = self.used_mb.lock();
        if limit != 0 && *used + mb > limit {
            return false;
        }
        *used += mb;
        true
    }

    /// Returns a reservation and wakes scalers waiting for memory.
    pub fn release(&self, mb: u64) {
        {
            let mut used = self.used_mb.lock();
            *used = used.saturating_sub(mb);
        }
        self.released.notify_waiters();
    }

    /// Resolves at the next release or limit change.
    pub async fn released(&self) {
        self.released.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_respects_limit() {
        let quota = Quota::new(256);
        assert!(quota.try_reserve(128));
        assert!(quota.try_reserve(128));
        assert!(!quota.try_reserve(1));
        quota.release(128);
        assert!(quota.try_reserve(64));
        assert_eq!(quota.used_mb(), 192);
    }

    #[test]
    fn zero_limit_is_unlimited() {
        let quota = Quota::new(0);
        assert!(quota.try_reserve(1 << 40));
    }
}
