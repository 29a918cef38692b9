//! [`SecretStore`] in a JSON file that only its owner can read.
//!
//! Several processes may write it at once (`handler local` storing a refreshed token while an
//! operator stores credentials): each write reads the whole file and writes it back, so writes
//! take a lock on a file beside it (`secrets.json.lock`) across processes, or one would lose
//! the other's secret (a rotated refresh token, which cannot be had again).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use tokio::sync::Mutex;

use super::{Secret, SecretStore, SecretsError, is_valid_secret_name};

#[derive(Clone)]
pub struct FileSecrets {
    path: PathBuf,
    write_lock: Arc<Mutex<()>>,
}

impl FileSecrets {
    pub fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            write_lock: Arc::new(Mutex::new(())),
        }
    }

    fn read_all(&self) -> Result<BTreeMap<String, String>, SecretsError> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                // serde's message may quote file content; say where, not what.
                SecretsError::Unavailable(format!(
                    "{} is not a JSON object of names to values (line {}, column {})",
                    self.path.display(),
                    e.line(),
                    e.column()
                ))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeMap::new()),
            Err(e) => Err(SecretsError::Unavailable(format!(
                "{}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Waits for the lock that other processes writing the file take too; it is let go when
    /// the returned file is closed.
    fn lock_across_processes(&self) -> Result<std::fs::File, SecretsError> {
        let path = self.path.with_extension("json.lock");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(&path)
            .map_err(|e| SecretsError::Unavailable(format!("{}: {e}", path.display())))?;
        file.lock()
            .map_err(|e| SecretsError::Unavailable(format!("{}: {e}", path.display())))?;
        Ok(file)
    }

    /// Writes the whole file through a temporary file and a rename, so a crash never leaves a
    /// half-written secrets file.
    fn write_all(&self, secrets: &BTreeMap<String, String>) -> Result<(), SecretsError> {
        let io =
            |e: std::io::Error| SecretsError::Unavailable(format!("{}: {e}", self.path.display()));
        let tmp = self.path.with_extension("json.tmp");
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(&tmp).map_err(io)?;
        let text = serde_json::to_vec_pretty(secrets).expect("a map of strings serializes");
        file.write_all(&text).map_err(io)?;
        file.sync_all().map_err(io)?;
        std::fs::rename(&tmp, &self.path).map_err(io)
    }
}

#[async_trait]
impl SecretStore for FileSecrets {
    async fn get(&self, name: &str) -> Result<Option<Secret>, SecretsError> {
        Ok(self.read_all()?.remove(name).map(Secret::new))
    }

    async fn set(&self, name: &str, value: Secret) -> Result<(), SecretsError> {
        if !is_valid_secret_name(name) {
            return Err(SecretsError::InvalidName(name.to_string()));
        }
        let _guard = self.write_lock.lock().await;
        let store = self.clone();
        let name = name.to_string();
        tokio::task::spawn_blocking(move || {
            let _locked = store.lock_across_processes()?;
            let mut all = store.read_all()?;
            all.insert(name, value.expose().to_string());
            store.write_all(&all)
        })
        .await
        .map_err(|e| SecretsError::Unavailable(format!("the secrets write stopped: {e}")))?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn secrets_round_trip_in_an_owner_only_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        let store = FileSecrets::new(&path);
        assert!(store.get("int-a--b").await.unwrap().is_none());
        store.set("int-a--b", Secret::new("s3cret")).await.unwrap();
        store.set("int-a--c", Secret::new("other")).await.unwrap();
        assert_eq!(
            store.get("int-a--b").await.unwrap().unwrap().expose(),
            "s3cret"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            store.set("bad name", Secret::new("x")).await,
            Err(SecretsError::InvalidName(_))
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_processes_writing_at_once_lose_neither_secret() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        // Two stores of one file share no lock in memory, as two processes do not.
        let (a, b) = (FileSecrets::new(&path), FileSecrets::new(&path));
        let write = |store: FileSecrets, side: &'static str| {
            tokio::spawn(async move {
                for i in 0..40 {
                    store
                        .set(&format!("int-{side}-{i}"), Secret::new("v"))
                        .await
                        .unwrap();
                }
            })
        };
        let (ra, rb) = tokio::join!(write(a, "a"), write(b, "b"));
        ra.unwrap();
        rb.unwrap();
        let all = FileSecrets::new(&path).read_all().unwrap();
        assert_eq!(all.len(), 80, "every secret kept");
    }

    #[tokio::test]
    async fn a_corrupt_file_is_reported_without_its_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secrets.json");
        std::fs::write(&path, "{\"int-a--b\": \"leaky-value").unwrap();
        let err = FileSecrets::new(&path).get("int-a--b").await.unwrap_err();
        assert!(!err.to_string().contains("leaky"), "{err}");
    }
}
