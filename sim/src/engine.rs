//! Runs the pure serving model (`model.rs`) in real time and hands each request its events.
//!
//! It owns the mapping between wall-clock and model time (`time_scale` real seconds per model
//! second; 0 runs the model to idle at every admission so replies come at once), the one
//! mutex around the model, per-request event channels, and the ticker task that wakes at
//! the end of each engine step. It knows nothing of HTTP.
//!
//! A request whose receiver is gone (client disconnected) is aborted in the model the next
//! time it has an event, which frees its slot and blocks within one engine step.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use crate::model::{AdmitError, EventKind, Model, ModelRequest, ModelStats, RequestId};

#[derive(Debug, Error)]
pub enum SubmitError {
    #[error(transparent)]
    Admit(#[from] AdmitError),
    #[error("the worker is shutting down")]
    ShuttingDown,
}

/// Events of one request, in order; the channel closes after `Finished` (or at shutdown).
pub type Events = mpsc::UnboundedReceiver<EventKind>;

pub struct Engine {
    state: Mutex<Driver>,
    /// Where the KV cache's events go, when they are published.
    kv_events: Option<mpsc::UnboundedSender<crate::kv_publish::Batch>>,
    /// Wakes the ticker when work arrives so it can sleep until the new step's end.
    wake: Notify,
    time_scale: f64,
    started: Instant,
}

struct Driver {
    model: Model,
    subscribers: HashMap<RequestId, mpsc::UnboundedSender<EventKind>>,
    closed: bool,
}

impl Engine {
    pub fn new(model: Model, time_scale: f64) -> Arc<Self> {
        Engine::with_kv_events(model, time_scale, None)
    }

    /// Like `new`; the KV cache's events of every step are sent to `kv_events`.
    pub fn with_kv_events(
        mut model: Model,
        time_scale: f64,
        kv_events: Option<mpsc::UnboundedSender<crate::kv_publish::Batch>>,
    ) -> Arc<Self> {
        model.record_kv_events(kv_events.is_some());
        Arc::new(Engine {
            kv_events,
            state: Mutex::new(Driver { model, subscribers: HashMap::new(), closed: false }),
            wake: Notify::new(),
            time_scale,
            started: Instant::now(),
        })
    }

    /// Queues a request now and returns the receiver of its events.
    pub fn submit(&self, req: ModelRequest) -> Result<(RequestId, Events), SubmitError> {
        let mut d = self.lock();
        if d.closed {
            return Err(SubmitError::ShuttingDown);
        }
        let now = self.model_now(&d);
        let id = d.model.admit(now, req)?;
        let (tx, rx) = mpsc::unbounded_channel();
        d.subscribers.insert(id, tx);
        self.pump(&mut d, now);
        drop(d);
        self.wake.notify_one();
        Ok((id, rx))
    }

    /// The model's state now.
    pub fn stats(&self) -> ModelStats {
        let mut d = self.lock();
        let now = self.model_now(&d);
        self.pump(&mut d, now);
        d.model.stats()
    }

    /// Advances the model with real time until `shutdown` flips; then closes every event
    /// channel so that requests still in flight end instead of hanging.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        loop {
            let deadline = {
                let mut d = self.lock();
                let now = self.model_now(&d);
                self.pump(&mut d, now);
                d.model.next_event_time().and_then(|t| self.real_deadline(t))
            };
            let sleep = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                () = self.wake.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        let mut d = self.lock();
        d.closed = true;
        d.subscribers.clear();
    }

    fn lock(&self) -> MutexGuard<'_, Driver> {
        // A panic while holding the lock can only come from a bug in the model; serving on
        // with its state beats failing every later request.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn model_now(&self, d: &Driver) -> f64 {
        if self.time_scale > 0.0 { self.started.elapsed().as_secs_f64() / self.time_scale } else { d.model.now() }
    }

    /// The instant model time `t` is reached; `None` if it is too far to represent.
    fn real_deadline(&self, t: f64) -> Option<Instant> {
        let offset = Duration::try_from_secs_f64(t * self.time_scale).ok()?;
        self.started.checked_add(offset)
    }

    /// Advances the model to `now` (or to idle when time is not scaled) and delivers events.
    fn pump(&self, d: &mut Driver, now: f64) {
        let mut events = d.model.advance(now);
        if self.time_scale == 0.0 {
            events.extend(d.model.run_until_idle());
        }
        if let Some(tx) = &self.kv_events {
            let kv = d.model.drain_kv_events();
            if !kv.is_empty() {
                // vLLM stamps a batch with wall-clock time (what the EPP's lag metric reads).
                let ts =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
                let _ = tx.send(crate::kv_publish::Batch { ts, events: kv });
            }
        }
        let mut gone = Vec::new();
        for event in events {
            let finished = matches!(event.kind, EventKind::Finished(_));
            if let Some(tx) = d.subscribers.get(&event.id) {
                if tx.send(event.kind).is_err() {
                    gone.push(event.id);
                } else if finished {
                    d.subscribers.remove(&event.id);
                }
            }
        }
        for id in gone {
            d.subscribers.remove(&id);
            let aborted = d.model.abort(now, id);
            tracing::debug!(request = id.0, aborted, "receiver gone; request aborted");
        }
    }
}
