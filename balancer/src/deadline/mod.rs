//! Setting and enforcing a request's [`Deadline`](crate::Deadline) over a
//! whole stack.

mod future;
mod layer;

pub use future::DeadlineFuture;
pub use layer::{DeadlineLayer, EnforceDeadline};
