//! `GET /v2/<alias>/tags/list`, answered by the proxy itself. Clients such as `skopeo inspect`
//! list tags after reading a manifest; the real repository's list would name other builds'
//! images, so the answer holds the alias's planned tag only, and only when a HEAD of the planned
//! manifest finds it upstream. A digest-pinned alias has no tag to list: its answer is an empty
//! list without asking upstream (a tag request on it reads the pinned digest anyway).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, Method, StatusCode, header};

use super::Proxy;
use super::error::{ProxyError, envelope};
use super::forward::code_for;
use super::route::{Alias, ManifestRef};
use crate::oci::manifest::ACCEPT;
use crate::oci::token::repository_scope;
use crate::oci::transport;

/// The spec's tag list body.
#[derive(serde::Serialize)]
struct TagList<'a> {
    name: &'a str,
    tags: Vec<String>,
}

impl Proxy {
    /// The alias's tag list: its planned tag if it exists upstream, paginated by `n` and `last`.
    pub(super) async fn tags_list(&self, alias: Alias, query: &str) -> Result<Response, ProxyError> {
        let t = self.alias(alias)?;
        let mut tags = Vec::new();
        if let ManifestRef::Tag(tag) = &t.planned {
            let url = self.url(&t.host, &format!("{}/manifests/{tag}", t.repository));
            let scopes = vec![repository_scope(&t.repository, false)];
            let mut req = transport::Request::new(Method::HEAD, &t.host, url, scopes);
            req.headers.insert(header::ACCEPT, HeaderValue::from_static(ACCEPT));
            let resp = self.upstream.send(req).await?;
            match resp.status() {
                s if s.is_success() => tags.push(tag.clone()),
                // Like a repository without tags: the build has not pushed it yet.
                StatusCode::NOT_FOUND => {}
                s => {
                    let message = format!("upstream registry {} answered {s} for the planned tag", t.host);
                    return Ok(envelope(s, code_for(s), message));
                }
            }
        }
        let param = |key: &str| {
            url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
        };
        if let Some(last) = param("last") {
            tags.retain(|t| *t > last);
        }
        if let Some(n) = param("n").and_then(|n| n.parse::<usize>().ok()) {
            tags.truncate(n);
        }
        let body = serde_json::to_vec(&TagList { name: alias.name(), tags }).unwrap_or_default();
        let mut resp = (StatusCode::OK, body).into_response();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        h.insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        Ok(resp)
    }
}
