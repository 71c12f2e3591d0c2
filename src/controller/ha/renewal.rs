//! Seeing the lease manager's renewals succeed: a layer on the lease client that records, in
//! the [`Leadership`], when a patch that writes `renewTime` to bob's Lease was sent, once the
//! API server has answered it with the Lease held by this replica. kube-lease-manager offers no
//! hook for it, and its channel does not tell a failed renewal (`ha.rs`).

use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Either, Full};
use kube::client::Body;
use serde_json::Value;
use tokio::time::Instant;
use tower::{BoxError, Layer, Service};

use super::Leadership;

/// The layer: outermost on the lease client, so the instant is taken before the first try of a
/// request the retry layer may send again (a retry carries the same `renewTime`).
#[derive(Clone, Debug)]
pub struct RenewalLayer {
    leadership: Leadership,
    path: String,
    identity: String,
}

impl RenewalLayer {
    /// Records the renewals of Lease `name` in `namespace` by `identity`.
    pub fn new(leadership: Leadership, namespace: &str, name: &str, identity: &str) -> Self {
        let path = format!("/apis/coordination.k8s.io/v1/namespaces/{namespace}/leases/{name}");
        Self { leadership, path, identity: identity.to_string() }
    }
}

impl<S> Layer<S> for RenewalLayer {
    type Service = Renewals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Renewals { inner, layer: self.clone() }
    }
}

/// The recording service.
#[derive(Clone, Debug)]
pub struct Renewals<S> {
    inner: S,
    layer: RenewalLayer,
}

impl<S, B> Service<Request<Body>> for Renewals<S>
where
    S: Service<Request<Body>, Response = Response<B>, Error = BoxError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    type Response = Response<Either<B, Full<Bytes>>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let layer = self.layer.clone();
        Box::pin(async move {
            let sent = Instant::now();
            let patch = req.method() == Method::PATCH && req.uri().path() == layer.path;
            let body = if patch { req.body().try_clone() } else { None };
            if !writes_renew_time(body).await {
                return Ok(inner.call(req).await?.map(Either::Left));
            }
            let resp = inner.call(req).await?;
            if !resp.status().is_success() {
                return Ok(resp.map(Either::Left));
            }
            // A Lease is small: its answer is read here and handed on whole.
            let (parts, body) = resp.into_parts();
            let bytes = body.collect().await.map_err(Into::into)?.to_bytes();
            if holder(&bytes).as_deref() == Some(layer.identity.as_str()) {
                layer.leadership.renewed(sent);
            }
            Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))))
        })
    }
}

/// Whether a request body sets `spec.renewTime` (an acquisition or a renewal; a release sets
/// it to null, the transitions count patch leaves it out).
async fn writes_renew_time(body: Option<Body>) -> bool {
    let Some(body) = body else { return false };
    let Ok(bytes) = body.collect_bytes().await else { return false };
    serde_json::from_slice::<Value>(&bytes)
        .is_ok_and(|v| v.pointer("/spec/renewTime").is_some_and(|t| !t.is_null()))
}

/// The holder named by a Lease answer.
fn holder(bytes: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    v.pointer("/spec/holderIdentity")?.as_str().map(str::to_string)
}
