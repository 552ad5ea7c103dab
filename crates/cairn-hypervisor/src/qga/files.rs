//! Writing files into a running guest through its guest agent: restore into the guest.
//!
//! A file arrives in pieces ([`GuestFileWrite`]). The first piece checks that the target
//! does not exist (unless overwriting is asked for), creates its parent directories and
//! opens a temporary file beside it (`.NAME.cairn-restore`) with `guest-file-open` mode `w`;
//! later pieces reopen it with mode `a` and check with `guest-file-seek` that it holds
//! exactly the bytes sent so far, so a lost or repeated piece is refused rather than written
//! in the wrong place. The last piece sets mode, owner and time and renames the temporary
//! file over the target, so a restore interrupted half way never leaves a half-written file
//! under the target's name. Directories are created with `mkdir -p`. Mode, owner, time and
//! the rename run as one POSIX `sh` script through `guest-exec`, its arguments passed as
//! arguments (never spliced into the script).

use std::time::Duration;

use base64::Engine as _;
use cairn_api::host::{GUEST_FILE_PIECE, GuestFileWrite, GuestFileWritten};
use serde_json::json;

use crate::qga::{AgentCommands, GuestExec, QgaError, exec_wait};

/// How long one helper script (mkdir, chmod, rename) may run in the guest.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Exit status the scripts use for "the target exists".
const EXISTS: i64 = 17;

/// Why a write into the guest failed.
#[derive(Debug, thiserror::Error)]
pub enum GuestFileError {
    /// The request itself is wrong (a relative path, a piece too large, bad base64).
    #[error("{0}")]
    Invalid(String),
    /// The target exists and overwriting was not asked for, or pieces arrived out of order.
    #[error("{0}")]
    Conflict(String),
    /// The guest agent failed or did not answer.
    #[error("guest agent: {0}")]
    Agent(#[from] QgaError),
}

/// Checks a guest path: absolute, no empty, `.` or `..` component, no NUL.
fn check_path(p: &str) -> Result<(), GuestFileError> {
    let bad = !p.starts_with('/')
        || p.contains('\0')
        || p.len() > 4096
        || (p != "/"
            && p[1..]
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == ".."));
    if bad {
        return Err(GuestFileError::Invalid(format!(
            "guest path {p:?} must be absolute and normalized"
        )));
    }
    Ok(())
}

/// The temporary file a restore of `path` writes first.
fn temp_of(path: &str) -> String {
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    format!("{dir}/.{name}.cairn-restore")
}

/// Runs `script` with `sh -c`, `args` as `$1`, `$2`, …; returns the exit status.
async fn script(
    ga: &dyn AgentCommands,
    script: &str,
    args: &[String],
) -> Result<i64, GuestFileError> {
    let mut argv = vec!["-c".to_string(), script.to_string(), "sh".to_string()];
    argv.extend(args.iter().cloned());
    let req = GuestExec {
        path: "/bin/sh".into(),
        args: argv,
        capture_output: true,
        ..GuestExec::default()
    };
    let st = exec_wait(ga, &req, SCRIPT_TIMEOUT).await?;
    let code = st.exit_code.unwrap_or(-1);
    if code != 0 && code != EXISTS {
        return Err(GuestFileError::Conflict(format!(
            "in the guest: {} (exit {code})",
            String::from_utf8_lossy(&st.stderr).trim()
        )));
    }
    Ok(code)
}

/// `$1` target, `$2` mode (octal or empty), `$3` uid, `$4` gid, `$5` mtime (or empty).
const ATTRS: &str = r#"
[ -z "$2" ] || chmod "$2" "$1" || exit 1
[ -z "$3" ] || chown "$3:$4" "$1" || exit 1
[ -z "$5" ] || touch -c -d "@$5" "$1" || exit 1
"#;

fn attr_args(path: &str, req: &GuestFileWrite) -> Vec<String> {
    let opt = |v: Option<String>| v.unwrap_or_default();
    vec![
        path.to_string(),
        opt(req.mode.map(|m| format!("{:o}", m & 0o7777))),
        opt(req.uid.map(|u| u.to_string())),
        opt(req.gid.or(req.uid.map(|_| 0)).map(|g| g.to_string())),
        opt(req.mtime_s.map(|t| t.to_string())),
    ]
}

/// Writes one directory or one piece of a file into the guest.
pub async fn write(
    ga: &dyn AgentCommands,
    req: &GuestFileWrite,
) -> Result<GuestFileWritten, GuestFileError> {
    check_path(&req.path)?;
    if req.mode.is_some_and(|m| m > 0o7777) {
        return Err(GuestFileError::Invalid("mode beyond 0o7777".into()));
    }
    if req.dir {
        let s = format!(
            "[ \"$6\" = 1 ] || [ ! -e \"$1\" ] || exit 17\nmkdir -p \"$1\" || exit 1\n{ATTRS}"
        );
        let mut args = attr_args(&req.path, req);
        args.push(if req.overwrite { "1" } else { "0" }.into());
        if script(ga, &s, &args).await? == EXISTS {
            return Err(exists(&req.path));
        }
        return Ok(GuestFileWritten {
            path: req.path.clone(),
            bytes: 0,
            done: true,
        });
    }
    let data = base64::engine::general_purpose::STANDARD
        .decode(&req.data_b64)
        .map_err(|e| GuestFileError::Invalid(format!("data_b64: {e}")))?;
    if data.len() > GUEST_FILE_PIECE {
        return Err(GuestFileError::Invalid(format!(
            "a piece of {} bytes is over {GUEST_FILE_PIECE}",
            data.len()
        )));
    }
    if req.path == "/" {
        return Err(GuestFileError::Invalid("cannot write a file over /".into()));
    }
    let temp = temp_of(&req.path);
    if req.offset == 0 {
        let s = r#"[ "$3" = 1 ] || [ ! -e "$1" ] || exit 17
mkdir -p "$(dirname "$1")" || exit 1"#;
        let ow = if req.overwrite { "1" } else { "0" };
        let code = script(ga, s, &[req.path.clone(), temp.clone(), ow.into()]).await?;
        if code == EXISTS {
            return Err(exists(&req.path));
        }
    }
    let mode = if req.offset == 0 { "w" } else { "a" };
    let v = ga
        .command("guest-file-open", Some(json!({"path": temp, "mode": mode})))
        .await?;
    let handle = v
        .as_i64()
        .ok_or_else(|| QgaError::Protocol(format!("guest-file-open returned {v}")))?;
    let written = async {
        if req.offset > 0 {
            let at = ga
                .command(
                    "guest-file-seek",
                    Some(json!({"handle": handle, "offset": 0, "whence": "end"})),
                )
                .await?;
            let pos = at["position"].as_u64().unwrap_or(u64::MAX);
            if pos != req.offset {
                return Err(GuestFileError::Conflict(format!(
                    "{temp} holds {pos} bytes, not {}: a piece was lost or repeated; start \
                     again from offset 0",
                    req.offset
                )));
            }
        }
        // In writes the channel can carry (one, unless the piece is larger).
        for part in data.chunks(ga.max_write().max(1)) {
            let b64 = if part.len() == data.len() {
                req.data_b64.clone()
            } else {
                base64::engine::general_purpose::STANDARD.encode(part)
            };
            let w = ga
                .command(
                    "guest-file-write",
                    Some(json!({"handle": handle, "buf-b64": b64})),
                )
                .await?;
            if w["count"].as_u64() != Some(part.len() as u64) {
                return Err(GuestFileError::Conflict(format!(
                    "guest-file-write wrote {} of {} bytes",
                    w["count"],
                    part.len()
                )));
            }
        }
        Ok(())
    }
    .await;
    let closed = ga
        .command("guest-file-close", Some(json!({"handle": handle})))
        .await;
    written?;
    closed?;
    let bytes = req.offset + data.len() as u64;
    if req.last {
        let s = format!(
            r#"t="$6"; ow="$7"; d="$1"
[ "$ow" = 1 ] || [ ! -e "$d" ] || {{ rm -f "$t"; exit 17; }}
set -- "$t" "$2" "$3" "$4" "$5"
{ATTRS}
mv -f "$t" "$d" || exit 1"#
        );
        let mut args = attr_args(&req.path, req);
        let ow = if req.overwrite { "1" } else { "0" };
        args.extend([temp.clone(), ow.to_string()]);
        if script(ga, &s, &args).await? == EXISTS {
            return Err(exists(&req.path));
        }
    }
    Ok(GuestFileWritten {
        path: req.path.clone(),
        bytes,
        done: req.last,
    })
}

fn exists(path: &str) -> GuestFileError {
    GuestFileError::Conflict(format!(
        "{path} exists in the guest; restore with overwrite to replace it"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_normalized() {
        for ok in ["/", "/etc/hosts", "/a b/ü"] {
            assert!(check_path(ok).is_ok(), "{ok}");
        }
        for bad in ["", "etc", "/a/../b", "/a//b", "/a/./b", "/a/", "/a\0"] {
            assert!(check_path(bad).is_err(), "{bad:?}");
        }
        assert_eq!(temp_of("/etc/hosts"), "/etc/.hosts.cairn-restore");
        assert_eq!(temp_of("/x"), "/.x.cairn-restore");
    }
}
