//! The web gallery: server-rendered pages of thumbnails, 5 to a page like the original,
//! newest first, and a page per fractal. Templates and assets are compiled in.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use faafo_core::wire::FractalView;
use faafo_core::{Fractal, FractalState};
use faafo_store::{ListOrder, ListStart, Page};
use sha2::{Digest, Sha256};

use crate::{ApiError, AppState};

const PER_PAGE: u64 = 5;

/// One fractal as the pages show it: every field already formatted.
#[derive(Debug)]
struct Card {
    uuid: String,
    detail_url: String,
    image_url: String,
    preview_url: String,
    state: &'static str,
    state_message: String,
    done: bool,
    attempts: u32,
    width: u32,
    height: u32,
    dimensions: String,
    duration: String,
    iterations: u32,
    parameters: String,
    size: String,
    checksum: String,
    generated_by: String,
    created_at: String,
    finished_at: String,
    error: Option<String>,
}

impl Card {
    fn new(fractal: &Fractal) -> Card {
        let view = FractalView::new(fractal);
        let dash = || "–".to_owned();
        let state_message = match fractal.state {
            FractalState::Queued => "queued, waiting for a worker".to_owned(),
            FractalState::Running => format!("rendering (attempt {})", fractal.attempts),
            FractalState::Done => "done".to_owned(),
            FractalState::Failed => format!(
                "failed: {}",
                fractal.error.as_deref().unwrap_or("unknown reason")
            ),
        };
        Card {
            uuid: view.uuid.to_string(),
            detail_url: format!("/view/{}", view.uuid),
            image_url: faafo_core::wire::image_path(view.uuid),
            preview_url: faafo_core::wire::preview_path(view.uuid),
            state: fractal.state.as_str(),
            state_message,
            done: fractal.state == FractalState::Done,
            attempts: view.attempts,
            width: view.width,
            height: view.height,
            dimensions: format!("{} x {} pixels", view.width, view.height),
            duration: view
                .duration
                .map_or_else(dash, |d| format!("{d:.6} seconds")),
            iterations: view.iterations,
            parameters: format!(
                "xa={:?} xb={:?} ya={:?} yb={:?} c={:?}{:+?}i",
                view.xa, view.xb, view.ya, view.yb, view.cx, view.cy
            ),
            size: view.size.map_or_else(dash, |s| format!("{s} bytes")),
            checksum: view.checksum.unwrap_or_else(dash),
            generated_by: view.generated_by.unwrap_or_else(dash),
            created_at: view.created_at,
            finished_at: view.finished_at.unwrap_or_else(dash),
            error: view.error,
        }
    }
}

#[derive(Template)]
#[template(path = "index.html")]
struct IndexPage {
    page: u64,
    total: u64,
    total_pages: u64,
    pending: usize,
    signature: String,
    cards: Vec<Card>,
}

#[derive(Template)]
#[template(path = "detail.html")]
struct DetailPage {
    card: Card,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    title: &'a str,
    message: &'a str,
}

/// An error shown to a person: an HTML page with the right status.
pub struct PageError(ApiError);

impl From<ApiError> for PageError {
    fn from(error: ApiError) -> Self {
        PageError(error)
    }
}

impl From<faafo_store::StoreError> for PageError {
    fn from(error: faafo_store::StoreError) -> Self {
        PageError(error.into())
    }
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let status = self.0.status();
        if let ApiError::Internal(source) = &self.0 {
            tracing::error!(error = %source, "internal error on a gallery page");
        }
        let message = match &self.0 {
            ApiError::Internal(_) => {
                "Something went wrong on our side; the details are in the server log.".to_owned()
            }
            other => other.to_string(),
        };
        let title = status.canonical_reason().unwrap_or("Error");
        (
            status,
            render(&ErrorPage {
                title,
                message: &message,
            }),
        )
            .into_response()
    }
}

/// A page, or a plain 500 if its template fails (logged).
pub(super) fn render(template: &impl Template) -> Response {
    match template.render() {
        Ok(html) => Html(html).into_response(),
        Err(error) => {
            tracing::error!(%error, "a page template failed to render");
            (StatusCode::INTERNAL_SERVER_ERROR, "page rendering failed").into_response()
        }
    }
}

fn parse_page(text: &str) -> Result<u64, PageError> {
    super::parse_page_number(text).ok_or_else(|| {
        PageError(ApiError::bad_request(format!(
            "{text:?} is not a page number"
        )))
    })
}

async fn load_page(state: &AppState, page: u64) -> Result<Page, PageError> {
    Ok(state
        .store
        .list(
            ListOrder::NewestFirst,
            ListStart::Offset((page - 1).saturating_mul(PER_PAGE)),
            PER_PAGE,
        )
        .await?)
}

/// Changes whenever the page would show something different.
fn signature(found: &Page) -> String {
    let mut hasher = Sha256::new();
    hasher.update(found.total.to_le_bytes());
    for fractal in &found.fractals {
        hasher.update(fractal.uuid.as_bytes());
        hasher.update(fractal.state.as_str());
    }
    hex::encode(&hasher.finalize()[..8])
}

#[utoipa::path(get, path = "/", tag = "gallery",
    summary = "The gallery's first page",
    responses((status = 200, description = "HTML", content_type = "text/html", body = String), (status = 503, description = "The store is unavailable", content_type = "text/html", body = String)))]
pub async fn first_page(State(state): State<Arc<AppState>>) -> Result<Response, PageError> {
    show_page(&state, 1).await
}

#[utoipa::path(get, path = "/index/{page}", tag = "gallery",
    summary = "A page of the gallery",
    params(("page" = u32, Path, minimum = 1, description = "Page number, from 1")),
    responses((status = 200, description = "HTML", content_type = "text/html", body = String), (status = 400, description = "Not a page number", content_type = "text/html", body = String), (status = 404, description = "No such page", content_type = "text/html", body = String), (status = 503, description = "The store is unavailable", content_type = "text/html", body = String)))]
pub async fn page(
    State(state): State<Arc<AppState>>,
    Path(page): Path<String>,
) -> Result<Response, PageError> {
    show_page(&state, parse_page(&page)?).await
}

async fn show_page(state: &AppState, page: u64) -> Result<Response, PageError> {
    let found = load_page(state, page).await?;
    let cards: Vec<Card> = found.fractals.iter().map(Card::new).collect();
    Ok(render(&IndexPage {
        page,
        total: found.total,
        total_pages: found.total.div_ceil(PER_PAGE).max(1),
        pending: cards.iter().filter(|card| !card.done).count(),
        signature: signature(&found),
        cards,
    }))
}

#[utoipa::path(get, path = "/index/{page}/signature", tag = "gallery",
    summary = "What the page shows, in short: it reloads when this changes",
    params(("page" = u32, Path, minimum = 1, description = "Page number, from 1")),
    responses((status = 200, description = "The signature", content_type = "text/plain", body = String), (status = 400, description = "Not a page number", content_type = "text/html", body = String), (status = 404, description = "No such page", content_type = "text/html", body = String), (status = 503, description = "The store is unavailable", content_type = "text/html", body = String)))]
pub async fn page_signature(
    State(state): State<Arc<AppState>>,
    Path(page): Path<String>,
) -> Result<String, PageError> {
    let page = parse_page(&page)?;
    Ok(signature(&load_page(&state, page).await?))
}

#[utoipa::path(get, path = "/view/{uuid}", tag = "gallery",
    summary = "One fractal's page",
    params(("uuid" = Uuid, Path, description = "The fractal's uuid")),
    responses((status = 200, description = "HTML", content_type = "text/html", body = String), (status = 400, description = "Not a uuid", content_type = "text/html", body = String), (status = 404, description = "No such fractal", content_type = "text/html", body = String), (status = 503, description = "The store is unavailable", content_type = "text/html", body = String)))]
pub async fn detail(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
) -> Result<Response, PageError> {
    let fractal = find(&state, &uuid).await?;
    Ok(render(&DetailPage {
        card: Card::new(&fractal),
    }))
}

#[utoipa::path(get, path = "/view/{uuid}/signature", tag = "gallery",
    summary = "What the fractal's page shows, in short",
    params(("uuid" = Uuid, Path, description = "The fractal's uuid")),
    responses((status = 200, description = "The signature", content_type = "text/plain", body = String), (status = 400, description = "Not a uuid", content_type = "text/html", body = String), (status = 404, description = "No such fractal", content_type = "text/html", body = String), (status = 503, description = "The store is unavailable", content_type = "text/html", body = String)))]
pub async fn detail_signature(
    State(state): State<Arc<AppState>>,
    Path(uuid): Path<String>,
) -> Result<String, PageError> {
    Ok(find(&state, &uuid).await?.state.as_str().to_owned())
}

async fn find(state: &AppState, uuid: &str) -> Result<Fractal, PageError> {
    let uuid = super::parse_uuid(uuid)?;
    Ok(state
        .store
        .get(uuid)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("There is no fractal {uuid}.")))?)
}

#[utoipa::path(get, path = "/static/style.css", tag = "gallery",
    responses((status = 200, description = "CSS", content_type = "text/css", body = String)))]
pub async fn stylesheet() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("../../assets/style.css"),
    )
}

#[utoipa::path(get, path = "/static/gallery.js", tag = "gallery",
    responses((status = 200, description = "JavaScript", content_type = "text/javascript", body = String)))]
pub async fn script() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("../../assets/gallery.js"),
    )
}
