//! The one owner of every change to what the request path reads: endpoint sets from
//! discovery, engine state from scraping (LoRA adapters, cache geometry) and schedulers
//! from config reloads. A single thread applies them in arrival order — publish the pool to
//! the datastore, then tell the running scheduler's plugins; tell a new scheduler the
//! current pool, then install it — so no scheduler is ever left knowing an older pool than
//! the one published (the race a reload and a discovery update used to have).
//!
//! Senders never wait, except `scheduler`, which returns once the new scheduler is live.

use std::sync::Arc;
use std::sync::mpsc;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::datastore::{EngineInfo, PoolSnapshot};
use crate::discovery::EndpointSpec;
use crate::routing::{Built, Router};

enum Change {
    Endpoints(Arc<Vec<EndpointSpec>>),
    Engine(u32, EngineInfo),
    Scheduler(Arc<Built>, mpsc::Sender<()>),
}

/// A handle to the publisher thread; it stops when every handle is dropped.
#[derive(Clone)]
pub struct Publisher {
    tx: mpsc::Sender<Change>,
}

/// Called (on the publisher thread) with every endpoint set published, e.g. to start and
/// stop scrapers.
pub type OnPool = Box<dyn Fn(&PoolSnapshot) + Send>;

impl Publisher {
    /// Starts the publisher for `router`. `loaded` turns true once the first endpoint set
    /// is published.
    pub fn start(router: Arc<Router>, on_pool: OnPool, loaded: watch::Sender<bool>) -> std::io::Result<Publisher> {
        let (tx, rx) = mpsc::channel::<Change>();
        std::thread::Builder::new().name("epp-publisher".into()).spawn(move || {
            while let Ok(change) = rx.recv() {
                apply(&router, change, &on_pool, &loaded);
            }
        })?;
        Ok(Publisher { tx })
    }

    /// Publishes `specs` as the whole endpoint set.
    pub fn endpoints(&self, specs: Arc<Vec<EndpointSpec>>) {
        self.send(Change::Endpoints(specs));
    }

    /// Records endpoint `id`'s engine state (published only if it changed).
    pub fn engine(&self, id: u32, info: EngineInfo) {
        self.send(Change::Engine(id, info));
    }

    /// Installs `built` once it knows the current pool; returns when it is live.
    pub fn scheduler(&self, built: Arc<Built>) {
        let (done_tx, done_rx) = mpsc::channel();
        self.send(Change::Scheduler(built, done_tx));
        // An error means the publisher thread is gone (the process is stopping).
        let _ = done_rx.recv();
    }

    fn send(&self, change: Change) {
        if self.tx.send(change).is_err() {
            warn!("the pool publisher has stopped; change dropped");
        }
    }
}

fn apply(router: &Router, change: Change, on_pool: &OnPool, loaded: &watch::Sender<bool>) {
    let ds = router.datastore();
    match change {
        Change::Endpoints(specs) => {
            let (snapshot, diff) = ds.set_pool(&specs);
            on_pool(&snapshot);
            if !diff.is_empty() {
                info!(
                    generation = snapshot.generation,
                    endpoints = snapshot.endpoints.len(),
                    "endpoint pool published: {diff}"
                );
                router.built().pool_changed(snapshot.generation, &snapshot.infos());
            }
            loaded.send_replace(true);
        }
        Change::Engine(id, info) => {
            if let Some(snapshot) = ds.set_engine(id, &info) {
                router.built().pool_changed(snapshot.generation, &snapshot.infos());
            }
        }
        Change::Scheduler(built, done) => {
            let snapshot = ds.snapshot();
            if ds.loaded() {
                built.pool_changed(snapshot.generation, &snapshot.infos());
            }
            router.install(built);
            let _ = done.send(());
        }
    }
}
