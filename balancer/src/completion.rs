//! Completion trackers: what the balancer does with an endpoint's
//! [`Handle`] when a response arrives.

use std::fmt;

use tower::load::TrackCompletion;

use crate::endpoint::Handle;

/// A [`TrackCompletion`] that reads how much of the prompt the endpoint had
/// cached from each response and reports it
/// ([`Handle::report_cached_prefix`]), so that prefix affinity's index
/// learns what the node evicted; then finishes the request as
/// [`CompleteOnResponse`](tower::load::CompleteOnResponse) does.
///
/// An OpenAI-compatible server (vLLM, SGLang) says how many prompt tokens
/// it had cached in `usage.prompt_tokens_details.cached_tokens`:
///
/// ```
/// use keel_balancer::{Balancer, Policy, PrefixConfig, ReportCachedPrefix};
///
/// let prefix = PrefixConfig::default();
/// let blocks = prefix.clone();
/// let builder = Balancer::<usize, ()>::builder()
///     .policy(Policy::PrefixAffinity(prefix))
///     .track_completion(ReportCachedPrefix::new(
///         move |answer: &http::Response<serde_json::Value>| {
///             let cached = &answer.body()["usage"]["prompt_tokens_details"]["cached_tokens"];
///             cached.as_u64().map(|tokens| blocks.blocks_of_tokens(tokens))
///         },
///     ));
/// # let _ = builder;
/// ```
///
/// (`Balancer::<K, ()>::builder()`: the endpoint service type comes from
/// the `Discover` given to `build`.)
#[derive(Clone, Copy)]
pub struct ReportCachedPrefix<F> {
    cached_blocks: F,
}

impl<F> ReportCachedPrefix<F> {
    /// A tracker that asks `cached_blocks` for each response's cached
    /// leading blocks (`None`: the response does not say).
    pub fn new(cached_blocks: F) -> Self {
        ReportCachedPrefix { cached_blocks }
    }
}

impl<F> fmt::Debug for ReportCachedPrefix<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReportCachedPrefix").finish_non_exhaustive()
    }
}

impl<F, Res> TrackCompletion<Handle, Res> for ReportCachedPrefix<F>
where
    F: Fn(&Res) -> Option<usize> + Clone,
{
    type Output = Res;

    fn track_completion(&self, mut handle: Handle, response: Res) -> Res {
        if let Some(blocks) = (self.cached_blocks)(&response) {
            handle.report_cached_prefix(blocks);
        }
        response
    }
}
