//! The state file: objects created through the API, kept across daemon restarts.
//!
//! Written atomically (temporary file, fsync, rename, fsync of the directory) so a crash leaves
//! either the old or the new file, never a torn one.
use std::{
    fs::{self, File},
    io::{self, Write as _},
    path::{Path, PathBuf},
};

use crate::api::types::StateSpec;

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("cannot read state file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("state file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write state file {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The saved API state; None when there is no state file yet.
pub fn load(path: &Path) -> Result<Option<StateSpec>, PersistError> {
    let text = match fs::read(path) {
        Ok(text) => text,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(PersistError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|source| PersistError::Parse {
            path: path.to_owned(),
            source,
        })
}

pub fn save(path: &Path, state: &StateSpec) -> Result<(), PersistError> {
    let write_error = |source| PersistError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(write_error)?;
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(&readable_by_older_daemons(state))
        .map_err(|e| write_error(io::Error::other(e)))?;
    let mut file = File::create(&tmp).map_err(write_error)?;
    file.write_all(&bytes).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    fs::rename(&tmp, path).map_err(write_error)?;
    // The rename is durable only once the directory entry is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(write_error)?;
    Ok(())
}

/// `state` with every one-endpoint route in the single `fork` form, which daemons from before
/// fork sets read too: after a downgrade they keep the API objects, unless a route has several
/// endpoints.
fn readable_by_older_daemons(state: &StateSpec) -> StateSpec {
    let mut state = state.clone();
    for route in state.sandboxes.iter_mut().flat_map(|s| s.routes.iter_mut()) {
        if route.fork.is_none() && route.forks.len() == 1 {
            route.fork = route.forks.pop();
        }
    }
    state
}

/// Moves an unreadable state file aside so it is neither lost nor overwritten.
pub fn quarantine(path: &Path) -> io::Result<PathBuf> {
    let aside = path.with_extension(format!(
        "broken-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    ));
    fs::rename(path, &aside)?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::types::ServiceSpec;

    #[test]
    fn save_then_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/state.json");
        assert!(load(&path).unwrap().is_none());
        let state = StateSpec {
            services: vec![ServiceSpec {
                name: "a".into(),
                address: "10.0.0.1:80".into(),
                protocol: Default::default(),
            }],
            ..StateSpec::default()
        };
        save(&path, &state).unwrap();
        assert_eq!(load(&path).unwrap(), Some(state));
        assert!(!path.with_extension("json.tmp").exists());
    }

    #[test]
    fn one_endpoint_routes_are_saved_in_the_single_fork_form() {
        use crate::api::types::{RouteSpec, SandboxSpec};
        use crate::state::ForkErrorPolicy;

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let state = StateSpec {
            sandboxes: vec![SandboxSpec {
                key: "k".into(),
                members: vec![],
                routes: vec![
                    RouteSpec::new("one", ["10.0.0.1:80"], ForkErrorPolicy::Error),
                    RouteSpec::new(
                        "two",
                        ["10.0.0.1:80", "10.0.0.2:80"],
                        ForkErrorPolicy::Error,
                    ),
                ],
                inject_key: false,
            }],
            ..StateSpec::default()
        };
        save(&path, &state).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        let routes = &json["sandboxes"][0]["routes"];
        assert_eq!(routes[0]["fork"], "10.0.0.1:80", "{json}");
        assert!(routes[0].get("forks").is_none(), "{json}");
        assert_eq!(routes[1]["forks"][1], "10.0.0.2:80", "{json}");
        assert_eq!(
            load(&path).unwrap().unwrap().to_state().unwrap(),
            state.to_state().unwrap(),
            "the same state either way"
        );
    }

    #[test]
    fn a_broken_file_is_an_error_and_can_be_set_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, "{not json").unwrap();
        assert!(matches!(load(&path), Err(PersistError::Parse { .. })));
        let aside = quarantine(&path).unwrap();
        assert!(aside.exists() && !path.exists());
    }
}
