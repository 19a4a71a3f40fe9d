//! Prometheus metrics (`GET /metrics`): counters and histograms fed by the engine's event
//! stream and by the inbox as things happen, and gauges read from the store and the machine
//! when scraped, so a scrape always shows the state as it is.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use cib_core::event::{BuildId, Event, EventBody};
use cib_core::time::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabels {
    event: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReceiverLabels {
    receiver: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NotifierLabels {
    notifier: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// Every metric the server keeps.
pub struct Metrics {
    registry: Registry,
    deliveries: Family<DeliveryLabels, Counter>,
    builds: Family<StatusLabels, Counter>,
    queue_wait: Histogram,
    step_duration: Histogram,
    hook_to_start: Histogram,
    steps_running: Gauge,
    executor_errors: Family<KindLabels, Counter>,
    inbox_pending: Gauge,
    inbox_dead: Gauge,
    inbox_oldest_age: FloatGauge,
    lease_queue: Family<PoolLabels, Gauge>,
    notifier_outbox: Family<NotifierLabels, Gauge>,
    journal_length: Gauge,
    outbox_depth: Family<ReceiverLabels, Gauge>,
    /// When each live build was queued, and each running step started, for the histograms.
    times: Mutex<Times>,
}

#[derive(Default)]
struct Times {
    queued: BTreeMap<BuildId, Timestamp>,
    steps: BTreeMap<(BuildId, String, u32), Timestamp>,
    /// When the delivery that made a build was received.
    received: BTreeMap<BuildId, Timestamp>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn seconds(from: Timestamp, to: Timestamp) -> f64 {
    to.millis().saturating_sub(from.millis()) as f64 / 1000.0
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let deliveries = Family::<DeliveryLabels, Counter>::default();
        registry.register("cib_deliveries", "Webhook deliveries by event and outcome", deliveries.clone());
        let builds = Family::<StatusLabels, Counter>::default();
        registry.register("cib_builds", "Builds queued, started and finished, by status", builds.clone());
        let queue_wait = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register("cib_build_queue_wait_seconds", "From a build queued to started", queue_wait.clone());
        let step_duration = Histogram::new(exponential_buckets(0.05, 2.0, 18));
        registry.register("cib_step_duration_seconds", "How long step attempts ran", step_duration.clone());
        let hook_to_start = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        registry.register(
            "cib_hook_to_start_seconds",
            "From a webhook received to its build started",
            hook_to_start.clone(),
        );
        let steps_running = Gauge::default();
        registry.register("cib_steps_running", "Step attempts running now", steps_running.clone());
        let executor_errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "cib_executor_errors",
            "Step attempts that ended in an infrastructure error, by conclusion",
            executor_errors.clone(),
        );
        let inbox_pending = Gauge::default();
        registry.register("cib_inbox_pending", "Deliveries waiting to be processed", inbox_pending.clone());
        let inbox_dead = Gauge::default();
        registry.register("cib_inbox_dead", "Deliveries set aside after their last attempt", inbox_dead.clone());
        let inbox_oldest_age = FloatGauge::default();
        registry.register(
            "cib_inbox_oldest_pending_age_seconds",
            "Age of the oldest pending delivery (0 when none)",
            inbox_oldest_age.clone(),
        );
        let lease_queue = Family::<PoolLabels, Gauge>::default();
        registry.register("cib_lease_queue_length", "Requests waiting for each pool", lease_queue.clone());
        let notifier_outbox = Family::<NotifierLabels, Gauge>::default();
        registry.register(
            "cib_notifier_outbox_depth",
            "Updates waiting in each notifier's outbox",
            notifier_outbox.clone(),
        );
        let journal_length = Gauge::default();
        registry.register(
            "cib_journal_length",
            "Inputs a restart would replay (the journal since the last snapshot)",
            journal_length.clone(),
        );
        let outbox_depth = Family::<ReceiverLabels, Gauge>::default();
        registry.register(
            "cib_outgoing_webhook_outbox_depth",
            "Events stored but not yet acknowledged by each outgoing webhook receiver",
            outbox_depth.clone(),
        );
        Metrics {
            registry,
            deliveries,
            builds,
            queue_wait,
            step_duration,
            hook_to_start,
            steps_running,
            executor_errors,
            inbox_pending,
            inbox_dead,
            inbox_oldest_age,
            lease_queue,
            notifier_outbox,
            journal_length,
            outbox_depth,
            times: Mutex::new(Times::default()),
        }
    }
}

impl Metrics {
    /// A delivery's outcome: `accepted`, `duplicate`, `built`, `nothing`, `unserved`,
    /// `unreadable`, `retry`, `dead`.
    pub fn delivery(&self, event: &str, outcome: &str) {
        self.deliveries.get_or_create(&DeliveryLabels { event: event.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    /// Remembers when the delivery that made `build` was received.
    pub fn build_from_delivery(&self, build: &BuildId, received: Timestamp) {
        if let Ok(mut t) = self.times.lock() {
            t.received.insert(build.clone(), received);
        }
    }

    /// Takes one event of the engine's stream.
    pub fn event(&self, event: &Event) {
        let Ok(mut t) = self.times.lock() else { return };
        let status = |s: &str| StatusLabels { status: s.to_owned() };
        match &event.body {
            EventBody::BuildQueued { build, .. } => {
                self.builds.get_or_create(&status("queued")).inc();
                t.queued.insert(build.clone(), event.at);
            }
            EventBody::BuildStarted { build } => {
                self.builds.get_or_create(&status("started")).inc();
                if let Some(q) = t.queued.get(build) {
                    self.queue_wait.observe(seconds(*q, event.at));
                }
                if let Some(r) = t.received.remove(build) {
                    self.hook_to_start.observe(seconds(r, event.at));
                }
            }
            EventBody::StepStarted { build, step, attempt } => {
                self.steps_running.inc();
                t.steps.insert((build.clone(), step.clone(), *attempt), event.at);
            }
            EventBody::StepFinished { build, step, attempt, conclusion, .. } => {
                if let Some(started) = t.steps.remove(&(build.clone(), step.clone(), *attempt)) {
                    self.steps_running.dec();
                    self.step_duration.observe(seconds(started, event.at));
                }
                let text = serde_json::to_value(conclusion).ok().and_then(|v| v.as_str().map(str::to_owned));
                if let Some(kind) = text.filter(|k| k == "errored" || k == "interrupted") {
                    self.executor_errors.get_or_create(&KindLabels { kind }).inc();
                }
            }
            EventBody::BuildFinished { build, conclusion } => {
                let text = serde_json::to_value(conclusion).ok().and_then(|v| v.as_str().map(str::to_owned));
                self.builds.get_or_create(&status(text.as_deref().unwrap_or("unknown"))).inc();
                t.queued.remove(build);
                t.received.remove(build);
                // Steps of a finished build that never reported their end are not running.
                let stale: Vec<_> = t.steps.keys().filter(|(b, _, _)| b == build).cloned().collect();
                for key in stale {
                    t.steps.remove(&key);
                    self.steps_running.dec();
                }
            }
            _ => {}
        }
    }

    /// Sets the gauges that are read when scraped.
    pub fn inbox(&self, depth: cib_core::ports::InboxDepth, now: Timestamp) {
        self.inbox_pending.set(i64::try_from(depth.pending).unwrap_or(i64::MAX));
        self.inbox_dead.set(i64::try_from(depth.dead).unwrap_or(i64::MAX));
        self.inbox_oldest_age.set(depth.oldest_pending.map_or(0.0, |o| seconds(o, now)));
    }

    pub fn lease_queue(&self, pool: &str, waiting: usize) {
        self.lease_queue
            .get_or_create(&PoolLabels { pool: pool.to_owned() })
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
    }

    pub fn notifier_outbox(&self, notifier: &str, depth: usize) {
        self.notifier_outbox
            .get_or_create(&NotifierLabels { notifier: notifier.to_owned() })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    pub fn journal_length(&self, length: u64) {
        self.journal_length.set(i64::try_from(length).unwrap_or(i64::MAX));
    }

    /// How many events a receiver has yet to acknowledge: the last event's sequence number
    /// minus the receiver's cursor.
    pub fn outbox_depth(&self, receiver: &str, depth: u64) {
        self.outbox_depth
            .get_or_create(&ReceiverLabels { receiver: receiver.to_owned() })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::warn!(error = %e, "cannot encode the metrics");
        }
        out
    }
}
