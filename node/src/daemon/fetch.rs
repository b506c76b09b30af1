//! A fetch job: one version's files fetched from their providers (who may change while
//! it runs) and staged in the version's folder.

use super::control::{lock, Shared};
use super::status::FetchStatus;
use slmesh_blobs::BlobNode;
use slmesh_protocol::NodeId;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// How often a fetch in progress says how far it is, in the log.
const PROGRESS_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);
const MIB: f64 = 1024.0 * 1024.0;

/// One version's files: fetched one after another from their ranked providers, then
/// staged in the version folder (hard links to the blob store's files where possible).
pub(super) struct FetchJob {
    pub name: String,
    pub version: u64,
    pub plan: Vec<(slmesh_protocol::manifest::FileEntry, watch::Receiver<Vec<NodeId>>)>,
    pub dir: PathBuf,
    pub blobs: Arc<BlobNode>,
    pub shared: Arc<Mutex<Shared>>,
}

impl FetchJob {
    pub async fn run(self) -> Result<PathBuf, String> {
        // Files staged already (a resumed job) need no room again.
        let to_stage: Vec<(slmesh_protocol::Hex32, u64)> = self
            .plan
            .iter()
            .filter(|(f, _)| !std::fs::metadata(self.dir.join(&f.name)).is_ok_and(|m| m.len() == f.size))
            .map(|(f, _)| (f.blake3, f.size))
            .collect();
        let _room = self.blobs.reserve_space(&to_stage, &self.dir).await.map_err(|e| e.to_string())?;
        for (file, providers) in &self.plan {
            let key = (self.name.clone(), self.version, file.name.clone());
            let started = std::time::Instant::now();
            let mut logged = (started, 0u64);
            let report = self
                .blobs
                .fetch(&file.blake3, file.size, providers.clone(), |p| {
                    // A line in the log every PROGRESS_LOG_EVERY while the file comes in.
                    let since = logged.0.elapsed();
                    if since >= PROGRESS_LOG_EVERY {
                        let rate = p.received.saturating_sub(logged.1) as f64 / since.as_secs_f64() / MIB;
                        let from = if p.received > 0 {
                            format!("last piece from {}", p.provider.short())
                        } else {
                            "no piece received yet".to_string()
                        };
                        tracing::info!(
                            model = %self.name, version = self.version, file = %file.name,
                            "fetching: {:.1} of {:.1} MiB, {rate:.2} MiB/s, {from}",
                            p.had.saturating_add(p.received) as f64 / MIB, p.size as f64 / MIB
                        );
                        logged = (std::time::Instant::now(), p.received);
                    }
                    lock(&self.shared).fetches.insert(
                        key.clone(),
                        FetchStatus {
                            model: self.name.clone(),
                            version: self.version,
                            file: file.name.clone(),
                            size: p.size,
                            had: p.had,
                            received: p.received,
                            provider: p.provider.to_string(),
                            secs: started.elapsed().as_secs_f64(),
                        },
                    );
                })
                .await
                .map_err(|e| e.to_string())?;
            tracing::info!(
                model = %self.name, version = self.version, file = %file.name, had = report.had,
                received = report.received, provider = ?report.provider.map(|p| p.short()),
                secs = report.elapsed.as_secs_f64(),
                failed_providers = report.failed.len(), "fetched"
            );
            for (provider, reason) in &report.failed {
                tracing::warn!(provider = %provider.short(), "provider failed during this fetch: {reason}");
            }
        }
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("cannot create {}: {e}", self.dir.display()))?;
        for (file, _) in &self.plan {
            let target = self.dir.join(&file.name);
            if std::fs::metadata(&target).is_ok_and(|m| m.len() == file.size) {
                continue;
            }
            // Written under a temporary name, synced, and renamed: neither a crash nor a
            // power loss leaves a half-copied file under the real name, and a file under
            // the real name is on disk before the version is marked staged.
            let partial = self.dir.join(format!(".{}.partial", file.name));
            if let Err(e) = std::fs::remove_file(&partial) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(format!("cannot remove {}: {e}", partial.display()));
                }
            }
            let how = self.blobs.stage(&file.blake3, file.size, &partial).await.map_err(|e| e.to_string())?;
            tracing::debug!(file = %file.name, ?how, "staged");
            sync_file(&partial)?;
            std::fs::rename(&partial, &target).map_err(|e| format!("cannot move {}: {e}", target.display()))?;
        }
        // The renames themselves.
        sync_file(&self.dir)?;
        Ok(self.dir)
    }
}

/// Flushes a file (or a folder's entries) to the disk.
fn sync_file(path: &std::path::Path) -> Result<(), String> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| format!("cannot sync {}: {e}", path.display()))
}
