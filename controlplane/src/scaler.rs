//! One scaler task per function. It sizes the function's instance set from demand, starting
//! instances at once when requests queue and draining idle ones after keep-warm, within the
//! function's min and max instances and the namespace's memory quota.
//!
//! The scaler owns the instances; the proxy only routes to them. It wakes when the proxy reports
//! demand, when a start finishes or an instance exits, when memory is released, when the
//! function changes, and at the next keep-warm or back-off deadline. It never polls.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

use fngate_proxy::{Function, Instance, InstanceState};
use metrics::{counter, gauge, histogram};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::backend::{InstanceBackend, InstanceFailure, RunningInstance, StartRequest};
use crate::model::FunctionSpec;
use crate::platform::InstanceStatus;
use crate::quota::Quota;

/// First back-off after a failed start; it doubles with each further failure.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest back-off between start attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How long a stopping instance gets after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// A function spec with its code resolved. `generation` changes whenever running instances
/// must be replaced (new code, env, memory or kind).
#[derive(Debug, Clone)]
pub struct Resolved {
    pub spec: Arc<FunctionSpec>,
    pub code_dir: PathBuf,
    /// SHA-256 of the code package; `None` for a directory source.
    pub code_digest: Option<String>,
    /// The function's merged layers, if it has any.
    pub layers: Option<crate::backend::Layers>,
    pub generation: u64,
}

/// Shutdown mode of a scaler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Keep running.
    No,
    /// Drain: let in-flight requests finish (up to the function's timeout), then stop instances.
    Drain,
    /// Stop instances at once; the proxy has already drained its connections.
    Now,
}

/// Inputs of a scaler task.
pub struct ScalerParts {
    pub function: Arc<Function>,
    pub backend: Arc<dyn InstanceBackend>,
    pub quota: Arc<Quota>,
    pub resolved: watch::Receiver<Resolved>,
    pub stop: watch::Receiver<Stop>,
    /// Set to each generation once instances of older generations are out of routing.
    pub applied: watch::Sender<u64>,
    pub status: Arc<Mutex<Vec<InstanceStatus>>>,
    /// The instances the scaler runs, ready or stopping, by id; published with `status`. The
    /// control plane sets a replica's reported usage on them.
    pub live: Arc<Mutex<HashMap<u64, Arc<Instance>>>>,
    pub instance_ids: Arc<AtomicU64>,
    /// The proxy replica whose pool `function` is: [`crate::backend::LOCAL_REPLICA`] for the
    /// proxy in this process, else a mirror of a replica's pool, which its pods are labelled
    /// with.
    pub replica: String,
    /// Whether the lane keeps the function's `min_instances` warm. False for the in-process
    /// proxy's lane of a namespace whose proxy Deployment serves its requests.
    pub keeps_minimum: Arc<std::sync::atomic::AtomicBool>,
}

enum Event {
    Started {
        id: u64,
        generation: u64,
        memory_mb: u64,
        result: Result<Box<dyn RunningInstance>, InstanceFailure>,
    },
    Exited {
        id: u64,
        failure: InstanceFailure,
    },
    Stopped {
        id: u64,
        memory_mb: u64,
    },
}

struct Managed {
    instance: Arc<Instance>,
    running: Arc<dyn RunningInstance>,
    /// Ends the task that waits for the instance to exit on its own. That wait never resolves
    /// once the instance was asked to stop, so the task must be cancelled to release it.
    exit_watch: Option<oneshot::Sender<()>>,
    generation: u64,
    memory_mb: u64,
    /// The maximum execution timeout of the versions this instance served, which bounds how
    /// long a request on it may still run when it is drained.
    timeout: Duration,
}

struct Scaler {
    parts: ScalerParts,
    ready: HashMap<u64, Managed>,
    /// Starts in progress, with the memory each reserved.
    starting: HashMap<u64, (JoinHandle<()>, u64)>,
    /// Instances being drained or stopped, with their state for status reports.
    stopping: HashMap<u64, (&'static str, Arc<Instance>)>,
    failures: u32,
    retry_at: Option<Instant>,
    quota_warned: bool,
    events_tx: mpsc::Sender<Event>,
    events_rx: mpsc::Receiver<Event>,
}

/// Runs the scaler until `parts.stop` leaves [`Stop::No`], then stops every instance.
pub async fn run(parts: ScalerParts) {
    let (events_tx, events_rx) = mpsc::channel(256);
    let mut scaler = Scaler {
        parts,
        ready: HashMap::new(),
        starting: HashMap::new(),
        stopping: HashMap::new(),
        failures: 0,
        retry_at: None,
        quota_warned: false,
        events_tx,
        events_rx,
    };
    scaler.run().await;
}

impl Scaler {
    async fn run(&mut self) {
        let pool = Arc::clone(&self.parts.function.pool);
        let quota = Arc::clone(&self.parts.quota);
        let mut stop = self.parts.stop.clone();
        loop {
            self.reconcile();
            let wake_at = self.next_wake();
            tokio::select! {
                () = pool.demand_changed() => {}
                Some(event) = self.events_rx.recv() => self.handle(event),
                changed = self.parts.resolved.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    self.replace_outdated();
                }
                () = quota.released() => {}
                () = tokio::time::sleep_until(wake_at) => {}
                _ = stop.wait_for(|stop| *stop != Stop::No) => break,
            }
        }
        let drain = *self.parts.stop.borrow() != Stop::Now;
        self.shutdown(drain).await;
    }

    fn resolved(&self) -> Resolved {
        self.parts.resolved.borrow().clone()
    }

    /// Returns the minimum this lane keeps: the function's `min_instances`, or zero.
    fn min_instances(&self, spec: &FunctionSpec) -> u32 {
        if self.parts.keeps_minimum.load(SeqCst) {
            spec.min_instances
        } else {
            0
        }
    }

    fn reconcile(&mut self) {
        let resolved = self.resolved();
        let spec = &resolved.spec;
        self.retire_failed();

        let demand = self.parts.function.pool.demand();
        let min_instances = self.min_instances(spec);
        let desired = if min_instances == spec.min_instances {
            desired_instances(demand.total(), spec)
        } else {
            let lane_spec = FunctionSpec {
                min_instances,
                ..FunctionSpec::clone(spec)
            };
            desired_instances(demand.total(), &lane_spec)
        };
        let current = self.ready.len() + self.starting.len();
        let backing_off = self.retry_at.is_some_and(|at| Instant::now() < at);
        if desired > current && !backing_off {
            for _ in current..desired {
                if !self.start_one(&resolved) {
                    break;
                }
            }
        }
        self.scale_down(desired, spec);
        self.publish_status();
    }

    /// Starts one instance if the namespace quota allows. Returns false when it does not.
    fn start_one(&mut self, resolved: &Resolved) -> bool {
        let spec = &resolved.spec;
        let memory_mb = u64::from(spec.memory_mb);
        if !self.parts.quota.try_reserve(memory_mb) {
            self.parts.function.pool.set_capacity_note(Some(format!(
                "the namespace's memory quota is in use ({} of {} MB); stop other functions' instances or raise memory_quota_mb",
                self.parts.quota.used_mb(),
                self.parts.quota.limit_mb()
            )));
            if !self.quota_warned {
                tracing::warn!(
                    function = %self.parts.function.key,
                    limit_mb = self.parts.quota.limit_mb(),
                    used_mb = self.parts.quota.used_mb(),
                    "namespace memory quota reached; requests wait until memory is released"
                );
                self.quota_warned = true;
            }
            return false;
        }
        self.quota_warned = false;
        self.parts.function.pool.set_capacity_note(None);
        let id = self.parts.instance_ids.fetch_add(1, SeqCst);
        let request = StartRequest {
            instance_id: id,
            function: Arc::clone(spec),
            code_dir: resolved.code_dir.clone(),
            code_digest: resolved.code_digest.clone(),
            layers: resolved.layers.clone(),
            replica: self.parts.replica.clone(),
        };
        let backend = Arc::clone(&self.parts.backend);
        let events = self.events_tx.clone();
        let generation = resolved.generation;
        let task = tokio::spawn(async move {
            let result = backend.start(request).await;
            let _ = events
                .send(Event::Started {
                    id,
                    generation,
                    memory_mb,
                    result,
                })
                .await;
        });
        self.starting.insert(id, (task, memory_mb));
        true
    }

    /// Drains instances idle for longer than keep-warm, keeping at least `desired`.
    fn scale_down(&mut self, desired: usize, spec: &FunctionSpec) {
        let floor = desired.max(self.min_instances(spec) as usize);
        let excess = self.ready.len().saturating_sub(floor);
        if excess == 0 {
            return;
        }
        let keep_warm = spec.keep_warm();
        let mut idle: Vec<(u64, Duration)> = self
            .ready
            .iter()
            .filter(|(_, m)| m.instance.in_flight() == 0 && m.instance.idle_for() >= keep_warm)
            .map(|(id, m)| (*id, m.instance.idle_for()))
            .collect();
        idle.sort_by_key(|entry| std::cmp::Reverse(entry.1));
        for (id, idle_for) in idle.into_iter().take(excess) {
            tracing::info!(function = %self.parts.function.key, instance = id,
                idle_ms = idle_for.as_millis() as u64, "keep-warm expired; draining instance");
            self.retire(id, InstanceState::Draining);
        }
    }

    /// Stops instances the proxy found unreachable.
    fn retire_failed(&mut self) {
        let failed: Vec<u64> = self
            .ready
            .iter()
            .filter(|(_, m)| m.instance.state() == InstanceState::Failed)
            .map(|(id, _)| *id)
            .collect();
        for id in failed {
            tracing::warn!(function = %self.parts.function.key, instance = id,
                "instance unreachable; stopping it");
            self.retire(id, InstanceState::Failed);
        }
    }

    /// Takes an instance out of routing, waits for its requests when draining, then stops it.
    fn retire(&mut self, id: u64, state: InstanceState) {
        let Some(mut managed) = self.ready.remove(&id) else {
            return;
        };
        managed.exit_watch.take();
        self.parts
            .function
            .pool
            .remove_instance(managed.instance.id(), state);
        managed.instance.set_state(state);
        let label = if state == InstanceState::Draining {
            "draining"
        } else {
            "failed"
        };
        self.stopping
            .insert(id, (label, Arc::clone(&managed.instance)));
        let drain_grace =
            managed.timeout.max(self.resolved().spec.timeout()) + Duration::from_secs(1);
        let events = self.events_tx.clone();
        // A replica's pod is idle only once the replica reports it stopped routing there.
        let mirror = self.parts.replica != crate::backend::LOCAL_REPLICA;
        tokio::spawn(async move {
            managed.running.drain().await;
            if state == InstanceState::Draining {
                let instance = &managed.instance;
                let idle = async {
                    if mirror {
                        instance.wait_released().await;
                    } else {
                        instance.wait_idle().await;
                    }
                };
                let _ = tokio::time::timeout(drain_grace, idle).await;
            }
            managed.running.stop(STOP_GRACE).await;
            let _ = events
                .send(Event::Stopped {
                    id,
                    memory_mb: managed.memory_mb,
                })
                .await;
        });
    }

    /// Drains every instance started from an older generation of the function.
    fn replace_outdated(&mut self) {
        let timeout = self.resolved().spec.timeout();
        for managed in self.ready.values_mut() {
            managed.timeout = managed.timeout.max(timeout);
        }
        let generation = self.resolved().generation;
        let outdated: Vec<u64> = self
            .ready
            .iter()
            .filter(|(_, m)| m.generation != generation)
            .map(|(id, _)| *id)
            .collect();
        for id in outdated {
            tracing::info!(function = %self.parts.function.key, instance = id,
                "function changed; draining instance running the previous version");
            self.retire(id, InstanceState::Draining);
        }
        self.failures = 0;
        self.retry_at = None;
        self.parts.applied.send_replace(generation);
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Started {
                id,
                generation,
                memory_mb,
                result: Ok(running),
            } => self.on_ready(id, generation, memory_mb, Arc::from(running)),
            Event::Started {
                id,
                memory_mb,
                result: Err(failure),
                ..
            } => self.on_start_failed(id, memory_mb, failure),
            Event::Exited { id, failure } => {
                if let Some(managed) = self.ready.remove(&id) {
                    self.parts
                        .function
                        .pool
                        .remove_instance(managed.instance.id(), InstanceState::Failed);
                    self.parts.quota.release(managed.memory_mb);
                    // Removes what the exit left behind, such as a failed pod.
                    let running = Arc::clone(&managed.running);
                    tokio::spawn(async move { running.stop(Duration::ZERO).await });
                    tracing::warn!(function = %self.parts.function.key, instance = id,
                        error = %failure, "instance exited unexpectedly");
                    counter!("fngate_instance_exits_total", "namespace" => self.parts.function.key.namespace.clone(), "function" => self.parts.function.key.name.clone()).increment(1);
                }
            }
            Event::Stopped { id, memory_mb } => {
                self.stopping.remove(&id);
                self.parts.quota.release(memory_mb);
                tracing::info!(function = %self.parts.function.key, instance = id, "instance stopped");
            }
        }
    }

    fn on_ready(
        &mut self,
        id: u64,
        generation: u64,
        memory_mb: u64,
        running: Arc<dyn RunningInstance>,
    ) {
        self.starting.remove(&id);
        let resolved = self.resolved();
        let key = &self.parts.function.key;
        counter!("fngate_instance_starts_total", "namespace" => key.namespace.clone(), "function" => key.name.clone(), "result" => "ready").increment(1);
        histogram!("fngate_instance_boot_seconds", "namespace" => key.namespace.clone(), "function" => key.name.clone()).record(running.boot_time().as_secs_f64());
        // In k8s mode the pod watcher made the instance and routes it already.
        let routed = running.routed();
        let instance = routed.clone().unwrap_or_else(|| {
            Arc::new(Instance::new(
                id,
                running.addr(),
                resolved.spec.concurrency,
                running.boot_time(),
            ))
        });
        let (exit_watch, cancelled) = oneshot::channel::<()>();
        let managed = Managed {
            instance: Arc::clone(&instance),
            running: Arc::clone(&running),
            exit_watch: Some(exit_watch),
            generation,
            memory_mb,
            timeout: resolved.spec.timeout(),
        };
        self.ready.insert(id, managed);
        self.failures = 0;
        self.retry_at = None;
        tracing::info!(function = %key, instance = id, addr = %running.addr(),
            boot_ms = running.boot_time().as_millis() as u64, "instance ready");

        let events = self.events_tx.clone();
        tokio::spawn(async move {
            tokio::select! {
                failure = running.exited() => {
                    let _ = events.send(Event::Exited { id, failure }).await;
                }
                _ = cancelled => {}
            }
        });
        if generation != resolved.generation {
            self.retire(id, InstanceState::Draining);
            return;
        }
        if routed.is_none() {
            self.parts.function.pool.add_instance(instance);
        }
    }

    fn on_start_failed(&mut self, id: u64, memory_mb: u64, failure: InstanceFailure) {
        self.starting.remove(&id);
        self.parts.quota.release(memory_mb);
        let key = &self.parts.function.key;
        if let InstanceFailure::Preempted(reason) = &failure {
            // The next reconcile starts a replacement at once; waiting requests keep waiting.
            tracing::info!(function = %key, instance = id, reason = %reason,
                "instance removed while starting; starting a replacement");
            return;
        }
        counter!("fngate_instance_starts_total", "namespace" => key.namespace.clone(), "function" => key.name.clone(), "result" => "failed").increment(1);
        self.failures = self.failures.saturating_add(1);
        let delay = backoff(self.failures);
        let retry_at = Instant::now() + delay;
        self.retry_at = Some(retry_at);
        tracing::warn!(function = %key, instance = id, error = %failure,
            retry_in_ms = delay.as_millis() as u64, "instance failed to start");
        if self.ready.is_empty() && self.starting.is_empty() {
            self.parts
                .function
                .pool
                .record_start_failure(failure.to_string(), retry_at);
        }
    }

    /// When to wake without an event: the earliest keep-warm expiry or the end of back-off.
    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let mut wake = now + Duration::from_secs(3600);
        let spec = self.resolved().spec;
        if self.ready.len() > self.min_instances(&spec) as usize {
            for managed in self.ready.values() {
                let remaining = spec.keep_warm().saturating_sub(managed.instance.idle_for());
                wake = wake.min(now + remaining + Duration::from_millis(1));
            }
        }
        if let Some(retry_at) = self.retry_at {
            if retry_at > now {
                wake = wake.min(retry_at);
            }
        }
        wake
    }

    fn publish_status(&self) {
        let mut status: Vec<InstanceStatus> = Vec::new();
        for id in self.starting.keys() {
            status.push(InstanceStatus {
                id: *id,
                state: "starting",
                addr: None,
                in_flight: 0,
                replica: self.parts.replica.clone(),
            });
        }
        for (id, managed) in &self.ready {
            status.push(InstanceStatus {
                id: *id,
                state: "ready",
                addr: Some(managed.instance.addr().to_string()),
                in_flight: managed.instance.in_flight(),
                replica: self.parts.replica.clone(),
            });
        }
        for (id, (state, instance)) in &self.stopping {
            status.push(InstanceStatus {
                id: *id,
                state,
                addr: Some(instance.addr().to_string()),
                in_flight: instance.in_flight(),
                replica: self.parts.replica.clone(),
            });
        }
        status.sort_by_key(|s| s.id);
        *self.parts.status.lock() = status;
        let live = self
            .ready
            .iter()
            .map(|(id, managed)| (*id, Arc::clone(&managed.instance)))
            .chain(
                self.stopping
                    .iter()
                    .map(|(id, (_, instance))| (*id, Arc::clone(instance))),
            )
            .collect();
        *self.parts.live.lock() = live;

        let key = &self.parts.function.key;
        for (state, count) in [
            ("starting", self.starting.len()),
            ("ready", self.ready.len()),
            ("stopping", self.stopping.len()),
        ] {
            gauge!("fngate_instances", "namespace" => key.namespace.clone(), "function" => key.name.clone(), "replica" => self.parts.replica.clone(), "state" => state).set(count as f64);
        }
    }

    /// Stops everything, draining first when `drain`, and waits until all instances are gone.
    async fn shutdown(&mut self, drain: bool) {
        if drain {
            // A start in progress may already serve through a proxy replica, which routes its
            // pod as soon as the pod is ready. Each is let finish and then drained below.
            while !self.starting.is_empty() {
                match self.events_rx.recv().await {
                    Some(event) => self.handle(event),
                    None => break,
                }
            }
        }
        for (_, (task, memory_mb)) in self.starting.drain() {
            // Dropping the start future inside the task kills what it started.
            task.abort();
            self.parts.quota.release(memory_mb);
        }
        let ids: Vec<u64> = self.ready.keys().copied().collect();
        let state = if drain {
            InstanceState::Draining
        } else {
            InstanceState::Failed
        };
        for id in ids {
            self.retire(id, state);
        }
        while !self.stopping.is_empty() {
            match self.events_rx.recv().await {
                Some(Event::Stopped { id, memory_mb }) => {
                    self.stopping.remove(&id);
                    self.parts.quota.release(memory_mb);
                }
                Some(_) => {}
                None => break,
            }
        }
        self.publish_status();
    }
}

/// Instances needed for `demand` requests (in flight plus queued): one per `concurrency`
/// requests, rounded up, within the function's min and max instances.
pub fn desired_instances(demand: usize, spec: &FunctionSpec) -> usize {
    let concurrency = spec.concurrency.max(1) as usize;
    let min = spec.min_instances as usize;
    let max = (spec.max_instances as usize).max(min);
    demand.div_ceil(concurrency).clamp(min, max)
}

/// Delay before the next start after `failures` consecutive failed starts.
fn backoff(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(1 << exponent).min(BACKOFF_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn spec(concurrency: u32, min: u32, max: u32) -> FunctionSpec {
        let toml = format!(
            "namespace = \"default\"\nname = \"f\"\nkind = \"web\"\ncode = {{ directory = \"/srv\" }}\nconcurrency = {concurrency}\nmin_instances = {min}\nmax_instances = {max}\n"
        );
        toml::from_str(&toml).unwrap()
    }

    #[test]
    fn desired_rounds_up_and_clamps() {
        assert_eq!(desired_instances(0, &spec(1, 0, 10)), 0);
        assert_eq!(desired_instances(10, &spec(1, 0, 2)), 2);
        assert_eq!(desired_instances(5, &spec(4, 0, 10)), 2);
        assert_eq!(desired_instances(0, &spec(4, 3, 10)), 3);
    }

    proptest! {
        /// Enough slots for the demand unless max caps it, never more instances than needed
        /// beyond min, and always within [min, max].
        #[test]
        fn desired_covers_demand_within_bounds(
            demand in 0usize..10_000,
            concurrency in 1u32..64,
            min in 0u32..20,
            extra in 0u32..50,
        ) {
            let max = min + extra.max(1);
            let desired = desired_instances(demand, &spec(concurrency, min, max));
            prop_assert!(desired >= min as usize && desired <= max as usize);
            if desired < max as usize {
                prop_assert!(desired * concurrency as usize >= demand);
            }
            if desired > min as usize {
                prop_assert!((desired - 1) * (concurrency as usize) < demand);
            }
        }
    }

    #[test]
    fn backoff_doubles_up_to_max() {
        assert_eq!(backoff(1), Duration::from_millis(500));
        assert_eq!(backoff(2), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(2));
        assert_eq!(backoff(100), BACKOFF_MAX);
    }
}
