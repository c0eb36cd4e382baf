//! Setting and enforcing a request's [`Deadline`](crate::Deadline) over a
//! whole stack.

mod future;
mod layer;

pub use future::ResponseFuture;
pub use layer::{DeadlineLayer, EnforceDeadline};
