//! The PNGs, kept in an object store: a local directory by default.

use std::sync::Arc;

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use uuid::Uuid;

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImagesError {
    #[error("unsupported object store URL {0:?}: expected file:///absolute/directory")]
    UnsupportedUrl(String),
    #[error("image {0} is not in the object store")]
    Missing(Uuid),
    #[error("the object store is unavailable")]
    Unavailable(#[source] object_store::Error),
    #[error("cannot prepare the image directory {path}")]
    Directory {
        path: String,
        source: std::io::Error,
    },
}

/// Where fractal images live. Cloning shares the store.
#[derive(Debug, Clone)]
pub struct Images {
    store: Arc<dyn ObjectStore>,
}

/// Written at start-up and read by `/readyz` to prove the store answers.
const PROBE: &str = ".faafo-ready";

impl Images {
    /// Opens the object store a URL names. Only `file://` is supported so far.
    pub async fn open(url: &str) -> Result<Images, ImagesError> {
        let directory = url
            .strip_prefix("file://")
            .filter(|path| path.starts_with('/'));
        let Some(directory) = directory else {
            return Err(ImagesError::UnsupportedUrl(url.to_owned()));
        };
        let directory_error = |source| ImagesError::Directory {
            path: directory.to_owned(),
            source,
        };
        tokio::fs::create_dir_all(directory)
            .await
            .map_err(directory_error)?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(directory)
            .map_err(|e| directory_error(std::io::Error::other(e)))?;
        let images = Images {
            store: Arc::new(store),
        };
        images
            .store
            .put(&Path::from(PROBE), PutPayload::from_static(b"ok"))
            .await
            .map_err(ImagesError::Unavailable)?;
        Ok(images)
    }

    /// `fractals/ab/ab12...png`: spread over 256 prefixes, so no directory of a filesystem
    /// store (and no key prefix of an S3 one) takes every write.
    fn key(uuid: Uuid) -> Path {
        let text = uuid.to_string();
        Path::from(format!("fractals/{}/{text}.png", &text[..2]))
    }

    /// Stores the PNG of `uuid`, atomically: readers see the whole image or none.
    pub async fn put(&self, uuid: Uuid, png: Bytes) -> Result<(), ImagesError> {
        self.store
            .put(&Self::key(uuid), PutPayload::from_bytes(png))
            .await
            .map_err(ImagesError::Unavailable)?;
        Ok(())
    }

    pub async fn get(&self, uuid: Uuid) -> Result<Bytes, ImagesError> {
        let found = match self.store.get(&Self::key(uuid)).await {
            Ok(found) => found,
            Err(object_store::Error::NotFound { .. }) => return Err(ImagesError::Missing(uuid)),
            Err(e) => return Err(ImagesError::Unavailable(e)),
        };
        found.bytes().await.map_err(ImagesError::Unavailable)
    }

    /// Removes the PNG of `uuid`; an image that is not there is already removed.
    pub async fn delete(&self, uuid: Uuid) -> Result<(), ImagesError> {
        match self.store.delete(&Self::key(uuid)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(ImagesError::Unavailable(e)),
        }
    }

    /// Succeeds when the store answers reads.
    pub async fn probe(&self) -> Result<(), ImagesError> {
        self.store
            .head(&Path::from(PROBE))
            .await
            .map(|_| ())
            .map_err(ImagesError::Unavailable)
    }
}
