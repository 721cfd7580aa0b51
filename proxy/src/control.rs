//! The control API: small HTTP/1.1 JSON on its own listener.
//!
//! | method and path | body | answer |
//! |---|---|---|
//! | `GET /links` | | `[LinkStatus]` |
//! | `GET /links/{name}` | | `LinkStatus` |
//! | `PUT /links/{name}` | [`FaultsPatch`]: only the fields given change | `LinkStatus` |
//! | `POST /links/{name}/reset[?refuse=true\|false]` | | `{"connections_reset": n, "link": LinkStatus}` |
//! | `POST /links/{name}/heal` | | `LinkStatus` |
//!
//! Errors are `{"reason": "LINK_NOT_FOUND", "message": "..."}` with 404, or
//! 400 for `INVALID_FAULTS` / `BAD_REQUEST`. A name with `>` must be
//! percent-encoded in the path (`us-east-1-%3Eeu-west-1`); [`crate::ControlClient`]
//! does that.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::error::Error;
use crate::faults::FaultsPatch;
use crate::set::{LinkStatus, ProxySet};

/// How long [`ControlServer::shutdown`] waits for requests in progress, in
/// milliseconds.
pub const CONTROL_SHUTDOWN_WAIT_MS: u64 = 5_000;

/// The body of an error answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// A stable code: `LINK_NOT_FOUND`, `INVALID_FAULTS`, `BAD_REQUEST`.
    pub reason: String,
    /// For people.
    pub message: String,
}

/// The answer to `POST /links/{name}/reset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResetReply {
    /// Connections open when the reset was asked; each is closed with an RST.
    pub connections_reset: u64,
    /// The link after the reset.
    pub link: LinkStatus,
}

/// Query of `POST /links/{name}/reset`.
#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct ResetQuery {
    /// Also set (or clear) `refuse` in the same step.
    refuse: Option<bool>,
}

struct ApiError(StatusCode, ErrorBody);

impl From<Error> for ApiError {
    fn from(e: Error) -> Self {
        let status = match e {
            Error::LinkNotFound(_) => StatusCode::NOT_FOUND,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError(status, ErrorBody { reason: e.reason().to_string(), message: e.to_string() })
    }
}

impl ApiError {
    fn bad_request(message: String) -> Self {
        ApiError(StatusCode::BAD_REQUEST, ErrorBody { reason: "BAD_REQUEST".into(), message })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// The routes of the control API over `set`, to mount in another server if
/// wanted; [`ControlServer`] serves them on their own listener.
pub fn router(set: ProxySet) -> Router {
    Router::new()
        .route("/links", get(list))
        .route("/links/{name}", get(show).put(set_faults))
        .route("/links/{name}/reset", post(reset))
        .route("/links/{name}/heal", post(heal))
        .with_state(set)
}

async fn list(State(set): State<ProxySet>) -> Json<Vec<LinkStatus>> {
    Json(set.statuses())
}

async fn show(State(set): State<ProxySet>, Path(name): Path<String>) -> ApiResult<LinkStatus> {
    Ok(Json(set.status(&name)?))
}

async fn set_faults(
    State(set): State<ProxySet>,
    Path(name): Path<String>,
    patch: Result<Json<FaultsPatch>, JsonRejection>,
) -> ApiResult<LinkStatus> {
    let Json(patch) = patch.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let handle = set.get(&name)?;
    let faults = handle.apply(&patch).map_err(Error::from)?;
    info!(link = %name, ?faults, "faults set");
    Ok(Json(set.status(&name)?))
}

async fn reset(
    State(set): State<ProxySet>,
    Path(name): Path<String>,
    query: Result<Query<ResetQuery>, QueryRejection>,
) -> ApiResult<ResetReply> {
    let Query(query) = query.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let handle = set.get(&name)?;
    let connections_reset = handle.reset(query.refuse);
    Ok(Json(ResetReply { connections_reset, link: set.status(&name)? }))
}

async fn heal(State(set): State<ProxySet>, Path(name): Path<String>) -> ApiResult<LinkStatus> {
    let faults = set.get(&name)?.heal();
    info!(link = %name, ?faults, "healed");
    Ok(Json(set.status(&name)?))
}

/// The control API running on its own listener.
#[derive(Debug)]
pub struct ControlServer {
    local_addr: SocketAddr,
    /// Fired by shutdown to stop accepting.
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Binds `addr` (port 0 allowed) and serves [`router`] over `set`.
    pub async fn start(set: ProxySet, addr: SocketAddr) -> Result<ControlServer, Error> {
        let listener = TcpListener::bind(addr).await.map_err(|source| Error::Bind { addr, source })?;
        let local_addr = listener.local_addr().map_err(|source| Error::Bind { addr, source })?;
        let (stop, stopped) = oneshot::channel::<()>();
        let serve = axum::serve(listener, router(set)).with_graceful_shutdown(async {
            let _ = stopped.await;
        });
        let task = tokio::spawn(async move {
            if let Err(e) = serve.await {
                warn!("control server failed: {e}");
            }
        });
        info!(%local_addr, "control API listening");
        Ok(ControlServer { local_addr, stop: Some(stop), task: Some(task) })
    }

    /// Where the API listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for requests in progress, at most
    /// [`CONTROL_SHUTDOWN_WAIT_MS`].
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(mut task) = self.task.take() {
            let wait = Duration::from_millis(CONTROL_SHUTDOWN_WAIT_MS);
            if tokio::time::timeout(wait, &mut task).await.is_err() {
                warn!("control server did not stop in time; aborting it");
                task.abort();
            }
        }
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
