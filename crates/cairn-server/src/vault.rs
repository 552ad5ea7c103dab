//! The server's one direct use of the vault: opening it to forget pruned backups.

use cairn_api::storage::VaultTarget;
use cairn_vault::Vault;

use crate::{Result, ServerError};

/// Connects to the vault a [`VaultTarget`] names: a vault service (`https://`, token and
/// fingerprint required) or a local repository directory (an absolute path).
pub(crate) fn open(target: &VaultTarget) -> Result<Box<dyn Vault>> {
    let failed = |e: &dyn std::fmt::Display| ServerError::Failed(format!("vault: {e}"));
    if target.url.starts_with("https://") {
        let (Some(token), Some(fp)) = (&target.token, &target.fingerprint) else {
            return Err(ServerError::Invalid(
                "a vault service needs a token and a fingerprint".into(),
            ));
        };
        let v = cairn_vault::remote::RemoteVault::connect(
            &target.url,
            token,
            &cairn_http::Trust::Fingerprint(fp.clone()),
        )
        .map_err(|e| failed(&e))?;
        return Ok(Box::new(v));
    }
    if cairn_vault::location::is_s3(&target.url) {
        let repo = cairn_vault::Repository::open_location(std::path::Path::new(&target.url))
            .map_err(|e| failed(&e))?;
        return Ok(Box::new(cairn_vault::LocalVault { repo }));
    }
    let dir = std::path::PathBuf::from(target.url.strip_prefix("file://").unwrap_or(&target.url));
    if !dir.is_absolute() {
        return Err(ServerError::Invalid(format!(
            "vault url {:?}: https://..., s3://... or an absolute path",
            target.url
        )));
    }
    let repo = cairn_vault::Repository::open_dir(&dir).map_err(|e| failed(&e))?;
    Ok(Box::new(cairn_vault::LocalVault { repo }))
}
