//! The invocation hub: a FIFO queue of events between the invoke listener and the bootstrap.
//!
//! The bootstrap handles one invocation at a time, as in SCF's custom runtime: `next` hands
//! out the oldest queued event and makes it the running invocation, and the first
//! `/response` or `/error` completes it. Each invocation carries a oneshot sender through which
//! exactly one [`Outcome`] reaches the waiting invoke request. The hub only records the running
//! invocation's deadline; the supervisor enforces it.

use std::collections::VecDeque;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;

/// One event waiting for the bootstrap, with the limits sent to the bootstrap.
#[derive(Debug)]
pub(crate) struct Invocation {
    pub request_id: String,
    pub memory_mb: u64,
    pub timeout: Duration,
    pub content_type: Option<http::HeaderValue>,
    pub event: Bytes,
    pub reply: oneshot::Sender<Outcome>,
}

/// The event handed to the bootstrap by `next`, without the reply channel.
#[derive(Debug)]
pub(crate) struct HandedOut {
    pub request_id: String,
    pub memory_mb: u64,
    pub timeout: Duration,
    pub content_type: Option<http::HeaderValue>,
    pub event: Bytes,
}

/// End of an invocation, sent to the invoke request waiting for it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The bootstrap posted `/runtime/invocation/response` with this body.
    Response(Bytes),
    /// The bootstrap posted `/runtime/invocation/error` with this body.
    Error(Bytes),
    /// The bootstrap took the event but posted nothing within the time limit.
    TimedOut { timeout: Duration },
    /// The bootstrap asked for the next event without completing this one.
    Abandoned { next_request_id: String },
    /// The bootstrap exited or the wrapper stopped while the invocation was running. The
    /// string describes why, e.g. "the bootstrap exited with status 3".
    Exited(String),
    /// The bootstrap exited or the wrapper stopped while the invocation was still queued, so
    /// the bootstrap never received it. The string describes why.
    NotStarted(String),
}

/// The bootstrap post that completed an invocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Completion {
    Response,
    Error,
}

/// Reason a new invocation was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum SubmitError {
    #[error(
        "{queued} invocations are already waiting for the bootstrap; retry later or add instances"
    )]
    QueueFull { queued: usize },
    #[error("the instance is stopping and takes no new invocations; retry on another instance")]
    Stopping,
    #[error("{0}; the instance takes no new invocations")]
    Closed(String),
}

/// Reason a `/response` or `/error` post was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum CompleteError {
    #[error("no invocation is outstanding: request {0} was already completed by an earlier post; post once per invocation")]
    AlreadyCompleted(String),
    #[error("no invocation is outstanding: call /runtime/invocation/next first")]
    NothingHandedOut,
}

/// The running invocation that passed its deadline, as reported to the supervisor.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Expired {
    pub request_id: String,
    pub timeout: Duration,
}

#[derive(Debug)]
struct Running {
    request_id: String,
    timeout: Duration,
    deadline: Instant,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Debug)]
enum Phase {
    Open,
    Stopping,
    Closed(String),
}

/// Identifies one submitted invocation, because callers may reuse a request id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket(u64);

#[derive(Debug)]
struct Queued {
    ticket: Ticket,
    invocation: Invocation,
}

#[derive(Debug)]
struct State {
    queue: VecDeque<Queued>,
    next_ticket: u64,
    running: Option<Running>,
    last_completed: Option<String>,
    phase: Phase,
}

/// Shared between the invoke listener, the runtime API and the supervisor.
#[derive(Debug)]
pub(crate) struct Hub {
    state: Mutex<State>,
    queued: Notify,
    deadline: watch::Sender<Option<Instant>>,
    max_queued: usize,
}

impl Hub {
    pub(crate) fn new(max_queued: usize) -> Self {
        Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                next_ticket: 0,
                running: None,
                last_completed: None,
                phase: Phase::Open,
            }),
            queued: Notify::new(),
            deadline: watch::Sender::new(None),
            max_queued,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // No code holding the lock panics, and the state stays consistent if one did.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends an invocation to the queue and wakes a waiting `next`. The returned ticket
    /// lets the caller [`withdraw`](Self::withdraw) the invocation while it is still queued.
    pub(crate) fn submit(&self, invocation: Invocation) -> Result<Ticket, SubmitError> {
        let ticket = {
            let mut state = self.lock();
            match &state.phase {
                Phase::Open => {}
                Phase::Stopping => return Err(SubmitError::Stopping),
                Phase::Closed(reason) => return Err(SubmitError::Closed(reason.clone())),
            }
            if state.queue.len() >= self.max_queued {
                return Err(SubmitError::QueueFull {
                    queued: state.queue.len(),
                });
            }
            let ticket = Ticket(state.next_ticket);
            state.next_ticket += 1;
            state.queue.push_back(Queued { ticket, invocation });
            ticket
        };
        self.queued.notify_waiters();
        Ok(ticket)
    }

    /// Removes the invocation from the queue if `next` has not handed it out yet, so the
    /// bootstrap never receives it. Returns whether it was removed. An invocation already
    /// handed out stays the running one and completes as usual.
    pub(crate) fn withdraw(&self, ticket: Ticket) -> bool {
        let mut state = self.lock();
        let Some(position) = state
            .queue
            .iter()
            .position(|queued| queued.ticket == ticket)
        else {
            return false;
        };
        if let Some(queued) = state.queue.remove(position) {
            tracing::debug!(request_id = %queued.invocation.request_id, "caller disconnected; removed its invocation from the queue");
        }
        true
    }

    /// Returns the number of invocations waiting for the bootstrap.
    pub(crate) fn queued_len(&self) -> usize {
        self.lock().queue.len()
    }

    /// Waits for the oldest queued invocation and makes it the running one.
    ///
    /// Cancel-safe: an invocation leaves the queue only in the same poll that returns it.
    /// hyper drops this future when the bootstrap's connection closes while it waits
    /// (observed with hyper 1.13).
    /// NOTE: an event handed out in the moment that connection closes never reaches the
    /// bootstrap, so its invocation ends by the time limit.
    pub(crate) async fn next(&self) -> HandedOut {
        loop {
            let notified = self.queued.notified();
            tokio::pin!(notified);
            // Registering before checking the queue means a submit between the check and the
            // await still wakes this future.
            notified.as_mut().enable();
            if let Some(handed_out) = self.try_hand_out() {
                return handed_out;
            }
            notified.await;
        }
    }

    fn try_hand_out(&self) -> Option<HandedOut> {
        let mut state = self.lock();
        // Skip invocations whose caller has gone, because their result has no reader. Callers
        // withdraw their invocation when they go, so this catches only a caller that is gone
        // but has not withdrawn yet.
        let invocation = loop {
            let candidate = state.queue.pop_front()?.invocation;
            if !candidate.reply.is_closed() {
                break candidate;
            }
            tracing::debug!(request_id = %candidate.request_id, "dropped a queued invocation whose caller disconnected");
        };

        if let Some(previous) = state.running.take() {
            tracing::warn!(
                request_id = %previous.request_id,
                next_request_id = %invocation.request_id,
                "bootstrap requested the next invocation without completing the running one"
            );
            let next_request_id = invocation.request_id.clone();
            let _ = previous.reply.send(Outcome::Abandoned { next_request_id });
        }

        let deadline = Instant::now() + invocation.timeout;
        state.running = Some(Running {
            request_id: invocation.request_id.clone(),
            timeout: invocation.timeout,
            deadline,
            reply: invocation.reply,
        });
        self.deadline.send_replace(Some(deadline));
        Some(HandedOut {
            request_id: invocation.request_id,
            memory_mb: invocation.memory_mb,
            timeout: invocation.timeout,
            content_type: invocation.content_type,
            event: invocation.event,
        })
    }

    /// Completes the running invocation with the bootstrap's post and returns its request id.
    pub(crate) fn complete(
        &self,
        completion: Completion,
        body: Bytes,
    ) -> Result<String, CompleteError> {
        let mut state = self.lock();
        let Some(running) = state.running.take() else {
            return Err(match &state.last_completed {
                Some(request_id) => CompleteError::AlreadyCompleted(request_id.clone()),
                None => CompleteError::NothingHandedOut,
            });
        };
        self.deadline.send_replace(None);

        let outcome = match completion {
            Completion::Response => Outcome::Response(body),
            Completion::Error => Outcome::Error(body),
        };
        if running.reply.send(outcome).is_err() {
            tracing::debug!(request_id = %running.request_id, "caller disconnected before the invocation completed");
        }
        state.last_completed = Some(running.request_id.clone());
        Ok(running.request_id)
    }

    /// Returns a receiver of the running invocation's deadline, `None` while none runs.
    pub(crate) fn watch_deadline(&self) -> watch::Receiver<Option<Instant>> {
        self.deadline.subscribe()
    }

    /// Fails the running invocation with [`Outcome::TimedOut`] if its deadline is at or before
    /// `now`, and stops taking new invocations, because the bootstrap is presumed stuck.
    pub(crate) fn expire(&self, now: Instant) -> Option<Expired> {
        let mut state = self.lock();
        if state.running.as_ref()?.deadline > now {
            return None;
        }
        let running = state.running.take()?;
        self.deadline.send_replace(None);
        state.phase = Phase::Stopping;

        let timeout = running.timeout;
        let _ = running.reply.send(Outcome::TimedOut { timeout });
        state.last_completed = Some(running.request_id.clone());
        Some(Expired {
            request_id: running.request_id,
            timeout,
        })
    }

    /// Rejects new invocations with [`SubmitError::Stopping`]; queued ones still run.
    pub(crate) fn stop_accepting(&self) {
        let mut state = self.lock();
        if matches!(state.phase, Phase::Open) {
            state.phase = Phase::Stopping;
        }
    }

    /// Fails the running invocation with [`Outcome::Exited`] and every queued one with
    /// [`Outcome::NotStarted`], and rejects later ones. `reason` is a lowercase clause such as
    /// "the bootstrap exited with status 3". After the first call, later calls keep the first
    /// reason.
    pub(crate) fn close(&self, reason: &str) {
        let mut state = self.lock();
        if !matches!(state.phase, Phase::Closed(_)) {
            state.phase = Phase::Closed(reason.to_string());
        }
        self.deadline.send_replace(None);
        if let Some(running) = state.running.take() {
            let _ = running.reply.send(Outcome::Exited(format!(
                "{reason} while the invocation was running"
            )));
        }
        for queued in state.queue.drain(..) {
            let _ = queued.invocation.reply.send(Outcome::NotStarted(format!(
                "{reason} before the invocation started"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invocation(request_id: &str, timeout_ms: u64) -> (Invocation, oneshot::Receiver<Outcome>) {
        let (reply, receiver) = oneshot::channel();
        let invocation = Invocation {
            request_id: request_id.to_string(),
            memory_mb: 128,
            timeout: Duration::from_millis(timeout_ms),
            content_type: None,
            event: Bytes::from(format!("event {request_id}")),
            reply,
        };
        (invocation, receiver)
    }

    #[tokio::test]
    async fn next_is_fifo() {
        let hub = Hub::new(8);
        let (first, _first_rx) = invocation("a", 1000);
        let (second, _second_rx) = invocation("b", 1000);
        hub.submit(first).expect("submit a");
        hub.submit(second).expect("submit b");

        assert_eq!(hub.next().await.request_id, "a");
        hub.complete(Completion::Response, Bytes::new())
            .expect("complete a");
        assert_eq!(hub.next().await.request_id, "b");
    }

    #[tokio::test]
    async fn next_waits_for_submit() {
        let hub = std::sync::Arc::new(Hub::new(8));
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.next().await.request_id }
        });
        tokio::task::yield_now().await;

        let (late, _late_rx) = invocation("late", 1000);
        hub.submit(late).expect("submit");

        assert_eq!(waiter.await.expect("join"), "late");
    }

    #[tokio::test]
    async fn first_post_wins() {
        let hub = Hub::new(8);
        let (only, receiver) = invocation("a", 1000);
        hub.submit(only).expect("submit");
        hub.next().await;

        assert_eq!(
            hub.complete(Completion::Error, Bytes::from("boom")),
            Ok("a".to_string())
        );
        assert_eq!(
            hub.complete(Completion::Response, Bytes::from("late")),
            Err(CompleteError::AlreadyCompleted("a".to_string()))
        );
        assert_eq!(
            receiver.await.expect("outcome"),
            Outcome::Error(Bytes::from("boom"))
        );
    }

    #[test]
    fn post_before_next_rejected() {
        let hub = Hub::new(8);
        assert_eq!(
            hub.complete(Completion::Response, Bytes::new()),
            Err(CompleteError::NothingHandedOut)
        );
    }

    #[tokio::test]
    async fn disconnected_caller_skipped() {
        let hub = Hub::new(8);
        let (gone, gone_rx) = invocation("gone", 1000);
        let (kept, _kept_rx) = invocation("kept", 1000);
        hub.submit(gone).expect("submit gone");
        hub.submit(kept).expect("submit kept");
        drop(gone_rx);

        assert_eq!(hub.next().await.request_id, "kept");
    }

    #[tokio::test]
    async fn withdraw_removes_queued_invocation() {
        let hub = Hub::new(1);
        let (first, _first_rx) = invocation("a", 1000);
        let (second, _second_rx) = invocation("b", 1000);
        let first_ticket = hub.submit(first).expect("submit a");

        assert!(hub.withdraw(first_ticket));
        assert_eq!(hub.queued_len(), 0);
        assert!(!hub.withdraw(first_ticket), "a ticket is withdrawn once");
        // The freed place in the queue takes the next invocation.
        hub.submit(second).expect("submit b");
        assert_eq!(hub.next().await.request_id, "b");
    }

    #[tokio::test]
    async fn withdraw_leaves_handed_out_invocation() {
        let hub = Hub::new(8);
        let (first, first_rx) = invocation("a", 1000);
        let ticket = hub.submit(first).expect("submit a");
        hub.next().await;

        assert!(!hub.withdraw(ticket));
        assert_eq!(
            hub.complete(Completion::Response, Bytes::from("done")),
            Ok("a".to_string())
        );
        assert_eq!(
            first_rx.await.expect("outcome"),
            Outcome::Response(Bytes::from("done"))
        );
    }

    #[tokio::test]
    async fn next_without_post_abandons_running() {
        let hub = Hub::new(8);
        let (first, first_rx) = invocation("a", 1000);
        let (second, _second_rx) = invocation("b", 1000);
        hub.submit(first).expect("submit a");
        hub.submit(second).expect("submit b");
        hub.next().await;
        hub.next().await;

        let outcome = first_rx.await.expect("outcome");
        assert_eq!(
            outcome,
            Outcome::Abandoned {
                next_request_id: "b".to_string()
            }
        );
    }

    #[test]
    fn queue_bound_rejects() {
        let hub = Hub::new(1);
        let (first, _first_rx) = invocation("a", 1000);
        let (second, _second_rx) = invocation("b", 1000);
        hub.submit(first).expect("submit a");

        assert_eq!(
            hub.submit(second),
            Err(SubmitError::QueueFull { queued: 1 })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn expire_only_after_deadline() {
        let hub = Hub::new(8);
        let deadline_rx = hub.watch_deadline();
        let (only, receiver) = invocation("a", 3000);
        hub.submit(only).expect("submit");
        let start = Instant::now();
        hub.next().await;

        assert_eq!(
            *deadline_rx.borrow(),
            Some(start + Duration::from_millis(3000))
        );
        assert_eq!(hub.expire(start + Duration::from_millis(2999)), None);
        let expired = hub
            .expire(start + Duration::from_millis(3000))
            .expect("expired");
        assert_eq!(expired.request_id, "a");
        assert_eq!(
            receiver.await.expect("outcome"),
            Outcome::TimedOut {
                timeout: Duration::from_millis(3000)
            }
        );
        assert_eq!(*deadline_rx.borrow(), None);

        let (late, _late_rx) = invocation("b", 1000);
        assert_eq!(hub.submit(late), Err(SubmitError::Stopping));
    }

    #[tokio::test]
    async fn close_fails_running_and_queued() {
        let hub = Hub::new(8);
        let (first, first_rx) = invocation("a", 1000);
        let (second, second_rx) = invocation("b", 1000);
        hub.submit(first).expect("submit a");
        hub.submit(second).expect("submit b");
        hub.next().await;

        hub.close("the bootstrap exited with status 7");

        let Outcome::Exited(running) = first_rx.await.expect("outcome a") else {
            panic!("expected Exited for the running invocation");
        };
        assert!(running.contains("status 7"), "{running}");
        let Outcome::NotStarted(queued) = second_rx.await.expect("outcome b") else {
            panic!("expected NotStarted for the queued invocation");
        };
        assert!(queued.contains("before the invocation started"), "{queued}");
        let (late, _late_rx) = invocation("c", 1000);
        assert!(matches!(hub.submit(late), Err(SubmitError::Closed(_))));
    }
}
