use tower_layer::Layer;

use super::Outlier;
use crate::recorder::Recorder;
use keel_core::DefaultClassifier;

/// Wraps an endpoint's service in [`Outlier`], recording every request's
/// outcome into the endpoint's [`Recorder`].
///
/// Get one from [`Health::outlier_layer`](crate::Health::outlier_layer) or
/// build it from a recorder.
#[derive(Clone, Debug)]
pub struct OutlierLayer<C = DefaultClassifier> {
    recorder: Recorder,
    classifier: C,
}

impl OutlierLayer {
    /// A layer recording into `recorder` with the [`DefaultClassifier`].
    pub fn new(recorder: Recorder) -> Self {
        OutlierLayer {
            recorder,
            classifier: DefaultClassifier,
        }
    }
}

impl<C> OutlierLayer<C> {
    /// A layer recording into `recorder`, classifying with `classifier`
    /// (any [`Classify`](crate::Classify), including a closure
    /// `Fn(&Result<Res, E>) -> Outcome`).
    pub fn with_classifier(recorder: Recorder, classifier: C) -> Self {
        OutlierLayer {
            recorder,
            classifier,
        }
    }

    /// The same layer with another classifier.
    pub fn classifier<C2>(self, classifier: C2) -> OutlierLayer<C2> {
        OutlierLayer {
            recorder: self.recorder,
            classifier,
        }
    }
}

impl<S, C: Clone> Layer<S> for OutlierLayer<C> {
    type Service = Outlier<S, C>;

    fn layer(&self, inner: S) -> Self::Service {
        Outlier::new(inner, self.recorder.clone(), self.classifier.clone())
    }
}
