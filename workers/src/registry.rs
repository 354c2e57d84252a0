//! Job kinds: each `kind` string maps to the async function that runs it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::job::{JobContext, JobResult};

type Handler = Arc<dyn Fn(JobContext) -> BoxFuture<'static, JobResult> + Send + Sync>;

/// The job kinds a worker can run. A claimed job of an unregistered kind fails at once.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `body` for jobs of `kind`; capture what it needs (config, paths) in a closure:
    /// `registry.register("count", move |ctx| count(ctx, settings.clone()))`.
    pub fn register<F, Fut>(&mut self, kind: impl Into<String>, body: F) -> &mut Self
    where
        F: Fn(JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |ctx| Box::pin(body(ctx)));
        self.handlers.insert(kind.into(), handler);
        self
    }

    pub(crate) fn get(&self, kind: &str) -> Option<Handler> {
        self.handlers.get(kind).cloned()
    }

    /// The registered kinds, for logs.
    pub fn kinds(&self) -> Vec<&str> {
        let mut kinds: Vec<&str> = self.handlers.keys().map(String::as_str).collect();
        kinds.sort_unstable();
        kinds
    }
}
