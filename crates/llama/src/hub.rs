//! Turning a model reference — a local path, or a Hugging Face Hub id — into a local directory.
//!
//! Hub models live in the Hugging Face cache, laid out as `huggingface_hub` and transformers
//! lay it out (`models--owner--name/refs/<revision>` holds a commit hash,
//! `models--owner--name/snapshots/<commit>/` the files), so a model downloaded by Python is
//! found here and the reverse.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use crate::checkpoint::{self, INDEX_FILE, SINGLE_FILE};
use crate::error::ModelError;

const CONFIG_FILE: &str = "config.json";
const TOKENIZER_FILE: &str = "tokenizer.json";

/// Fetched with the model when the repository has them.
const OPTIONAL_FILES: [&str; 4] = [
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Where the Hugging Face cache is and whether the network may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache directory, holding `models--owner--name` folders.
    pub cache_dir: PathBuf,
    /// Use only the cache, never the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Access token for gated or private repositories (`HF_TOKEN`); when `None`, downloads use
    /// the token file `huggingface-cli login` writes next to the cache, if any.
    pub token: Option<String>,
    /// Hub URL other than `https://huggingface.co` (`HF_ENDPOINT`), e.g. a mirror.
    pub endpoint: Option<String>,
}

impl HubSettings {
    /// Online settings for the cache at `cache_dir`, with no token and the default endpoint.
    pub fn new(cache_dir: PathBuf) -> Self {
        Self {
            cache_dir,
            offline: false,
            token: None,
            endpoint: None,
        }
    }

    /// The settings the Python libraries would use, from the environment.
    ///
    /// The cache is `$HF_HUB_CACHE`, else `$HF_HOME/hub`, else
    /// `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`. `HF_HUB_OFFLINE`
    /// set to `1`, `true`, `yes` or `on` means offline; `HF_TOKEN` and `HF_ENDPOINT` are used
    /// when set.
    ///
    /// # Errors
    ///
    /// [`ModelError::NotFound`] if none of those variables is set and the home directory is
    /// unknown.
    pub fn from_env() -> Result<Self, ModelError> {
        let var = |name: &str| std::env::var_os(name).filter(|value| !value.is_empty());
        let cache_dir = if let Some(hub_cache) = var("HF_HUB_CACHE") {
            PathBuf::from(hub_cache)
        } else if let Some(hf_home) = var("HF_HOME") {
            PathBuf::from(hf_home).join("hub")
        } else if let Some(xdg_cache) = var("XDG_CACHE_HOME") {
            PathBuf::from(xdg_cache).join("huggingface").join("hub")
        } else {
            let home =
                var("HOME")
                    .or_else(|| var("USERPROFILE"))
                    .ok_or_else(|| ModelError::NotFound {
                        what:
                            "cannot locate the Hugging Face cache: the home directory is unknown; \
                           set HF_HOME"
                                .to_string(),
                    })?;
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub")
        };
        let text = |name: &str| std::env::var(name).ok().filter(|value| !value.is_empty());
        Ok(Self {
            cache_dir,
            offline: text("HF_HUB_OFFLINE").is_some_and(|value| is_truthy(&value)),
            token: text("HF_TOKEN"),
            endpoint: text("HF_ENDPOINT"),
        })
    }
}

/// `huggingface_hub`'s reading of boolean environment variables.
fn is_truthy(value: &str) -> bool {
    matches!(
        value.trim().to_ascii_lowercase().as_str(),
        "1" | "on" | "yes" | "true"
    )
}

/// A Hub model reference, `owner/name` or `owner/name@revision`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelRef {
    /// The repository id, e.g. `HuggingFaceTB/SmolLM2-135M`.
    pub repo_id: String,
    /// A branch, tag or commit hash; `main` unless given.
    pub revision: String,
}

impl ModelRef {
    /// Parses `owner/name[@revision]` (a bare `name` is accepted too, as the Hub does), or
    /// returns `None` if `reference` cannot be a Hub id.
    pub fn parse(reference: &str) -> Option<Self> {
        let (repo_id, revision) = reference.split_once('@').unwrap_or((reference, "main"));
        let id_parts: Vec<&str> = repo_id.split('/').collect();
        let valid_id = repo_id.len() <= 96
            && id_parts.len() <= 2
            && id_parts.iter().all(|part| is_valid_id_part(part));
        let valid_revision = revision.split('/').all(is_plain_name);
        (valid_id && valid_revision).then(|| Self {
            repo_id: repo_id.to_string(),
            revision: revision.to_string(),
        })
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo_id.clone(), RepoType::Model, self.revision.clone())
    }
}

/// One `/`-separated part of a repo id, by `huggingface_hub`'s `validate_repo_id` rules.
fn is_valid_id_part(part: &str) -> bool {
    is_plain_name(part)
        && !part.contains("--")
        && !part.contains("..")
        && !part.starts_with(['-', '.'])
        && !part.ends_with(['-', '.'])
}

/// A non-empty name of letters, digits, `-`, `_` and `.` that is not `.` or `..`, so that it
/// is safe as one path component in the cache.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Resolves `reference` to a local model directory using the settings from the environment
/// (see [`HubSettings::from_env`] and [`resolve_model_with`]).
///
/// # Errors
///
/// As [`resolve_model_with`], plus [`ModelError::NotFound`] if the cache cannot be located.
pub fn resolve_model(reference: &str) -> Result<PathBuf, ModelError> {
    let local = Path::new(reference);
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    resolve_model_with(reference, &HubSettings::from_env()?)
}

/// Resolves `reference` to a local model directory.
///
/// An existing path is returned as it is. Otherwise `reference` must be a Hub id
/// (`owner/name[@revision]`): if the cache holds a snapshot of that revision with
/// `config.json`, `tokenizer.json` and all safetensors weights, its directory is returned
/// without using the network; if not, the missing files are downloaded into the cache (unless
/// offline) and the snapshot directory is returned.
///
/// # Errors
///
/// - [`ModelError::NotFound`] if `reference` is neither an existing path nor a Hub id;
/// - [`ModelError::Hub`] if offline and the model is not fully cached, or if the download
///   fails or the repository lacks a config, tokenizer or safetensors weights;
/// - errors reading a cached or downloaded shard index.
pub fn resolve_model_with(reference: &str, settings: &HubSettings) -> Result<PathBuf, ModelError> {
    let local = Path::new(reference);
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    let model = ModelRef::parse(reference).ok_or_else(|| ModelError::NotFound {
        what: format!(
            "`{reference}` is neither an existing file or directory nor a Hugging Face Hub id \
             (`owner/name` or `owner/name@revision`)"
        ),
    })?;
    let cached = cached_snapshot(&settings.cache_dir, &model);
    let missing = match &cached {
        Some(snapshot) => {
            let missing = missing_files(snapshot)?;
            if missing.is_empty() {
                return Ok(snapshot.clone());
            }
            missing
        }
        None => Vec::new(),
    };
    if settings.offline {
        let detail = match &cached {
            Some(snapshot) => format!(
                " (its snapshot {} lacks {})",
                snapshot.display(),
                missing.join(", ")
            ),
            None => String::new(),
        };
        return Err(ModelError::Hub {
            repo_id: model.repo_id.clone(),
            message: format!(
                "revision `{}` is not in the Hugging Face cache at {}{detail} and HF_HUB_OFFLINE \
                 is set; download it first or unset HF_HUB_OFFLINE (the cache is $HF_HUB_CACHE, \
                 else $HF_HOME/hub; no local path `{reference}` exists either)",
                model.revision,
                settings.cache_dir.display()
            ),
        });
    }
    download(&model, settings)
}

/// The snapshot directory the cache has for `model`'s revision, complete or not.
fn cached_snapshot(cache_dir: &Path, model: &ModelRef) -> Option<PathBuf> {
    let repo_dir = cache_dir.join(model.repo().folder_name());
    let snapshots = repo_dir.join("snapshots");
    let ref_file = model
        .revision
        .split('/')
        .fold(repo_dir.join("refs"), |path, part| path.join(part));
    let commit = match std::fs::read_to_string(ref_file) {
        Ok(commit) => commit.trim().to_string(),
        // A commit hash is its own snapshot name and has no ref file.
        Err(_) => model.revision.clone(),
    };
    let snapshot = snapshots.join(&commit);
    (is_plain_name(&commit) && snapshot.is_dir()).then_some(snapshot)
}

/// The files a model directory needs that `dir` lacks: config, tokenizer and weights.
fn missing_files(dir: &Path) -> Result<Vec<String>, ModelError> {
    let mut missing: Vec<String> = [CONFIG_FILE, TOKENIZER_FILE]
        .into_iter()
        .filter(|file| !dir.join(file).is_file())
        .map(str::to_string)
        .collect();
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        missing.extend(
            shard_files(&index)?
                .into_iter()
                .filter(|shard| !dir.join(shard).is_file()),
        );
    } else if !dir.join(SINGLE_FILE).is_file() {
        missing.push(format!("{SINGLE_FILE} (or {INDEX_FILE})"));
    }
    Ok(missing)
}

/// The distinct shard files a shard index lists.
fn shard_files(index: &Path) -> Result<BTreeSet<String>, ModelError> {
    Ok(checkpoint::read_weight_map(index)?.into_values().collect())
}

/// Downloads what the model needs into the cache and returns the snapshot directory.
fn download(model: &ModelRef, settings: &HubSettings) -> Result<PathBuf, ModelError> {
    let hub_error = |message: String| ModelError::Hub {
        repo_id: model.repo_id.clone(),
        message,
    };
    let mut builder = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()));
    if let Some(token) = &settings.token {
        builder = builder.with_token(Some(token.clone()));
    }
    if let Some(endpoint) = &settings.endpoint {
        builder = builder.with_endpoint(endpoint.clone());
    }
    let api = builder
        .build()
        .map_err(|e| hub_error(format!("cannot set up the download client: {e}")))?;
    let repo = api.repo(model.repo());
    let listing = repo.info().map_err(|e| {
        hub_error(format!(
            "cannot list the files of revision `{}`: {e} (check the id and the network; gated \
             and private models need HF_TOKEN; set HF_HUB_OFFLINE=1 to use only the cache)",
            model.revision
        ))
    })?;
    let available: BTreeSet<&str> = listing
        .siblings
        .iter()
        .map(|sibling| sibling.rfilename.as_str())
        .collect();
    let fetch = |file: &str| {
        repo.get(file)
            .map_err(|e| hub_error(format!("cannot download {file}: {e}")))
    };

    for required in [CONFIG_FILE, TOKENIZER_FILE] {
        if !available.contains(required) {
            return Err(hub_error(format!(
                "the repository has no {required}, which loading the model needs"
            )));
        }
    }
    let config = fetch(CONFIG_FILE)?;
    fetch(TOKENIZER_FILE)?;
    if available.contains(INDEX_FILE) {
        for shard in shard_files(&fetch(INDEX_FILE)?)? {
            fetch(&shard)?;
        }
    } else if available.contains(SINGLE_FILE) {
        fetch(SINGLE_FILE)?;
    } else {
        return Err(hub_error(format!(
            "the repository has no {SINGLE_FILE} or {INDEX_FILE}; only safetensors weights \
             can be loaded"
        )));
    }
    for optional in OPTIONAL_FILES {
        if available.contains(optional) {
            fetch(optional)?;
        }
    }
    // Downloads land in `snapshots/<commit>/<file>`.
    config.parent().map(Path::to_path_buf).ok_or_else(|| {
        hub_error(format!(
            "the downloaded {CONFIG_FILE} is at {}, outside a snapshot directory",
            config.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    /// A cache directory holding `models--owner--tiny` with the given snapshot files.
    struct FakeCache {
        dir: tempfile::TempDir,
    }

    impl FakeCache {
        fn new() -> Self {
            Self {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn cache_dir(&self) -> PathBuf {
            self.dir.path().join("hub")
        }

        fn repo_dir(&self) -> PathBuf {
            self.cache_dir().join("models--owner--tiny")
        }

        /// Creates `snapshots/<commit>/` with `files` (empty ones; only existence matters,
        /// except for a shard index, which is read).
        fn snapshot(&self, commit: &str, files: &[(&str, &str)]) -> PathBuf {
            let snapshot = self.repo_dir().join("snapshots").join(commit);
            fs::create_dir_all(&snapshot).unwrap();
            for (name, contents) in files {
                fs::write(snapshot.join(name), contents).unwrap();
            }
            snapshot
        }

        /// Points `refs/<revision>` at `commit`, with the trailing newline some tools write.
        fn point(&self, revision: &str, commit: &str) {
            let ref_file = self.repo_dir().join("refs").join(revision);
            fs::create_dir_all(ref_file.parent().unwrap()).unwrap();
            fs::write(ref_file, format!("{commit}\n")).unwrap();
        }

        fn settings(&self, offline: bool) -> HubSettings {
            HubSettings {
                offline,
                ..HubSettings::new(self.cache_dir())
            }
        }
    }

    const COMPLETE: [(&str, &str); 3] = [
        ("config.json", "{}"),
        ("tokenizer.json", "{}"),
        ("model.safetensors", ""),
    ];

    const SHARD_INDEX: &str = r#"{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#;

    #[test]
    fn existing_local_path_is_returned_as_is() {
        let dir = tempfile::tempdir().unwrap();
        let reference = dir.path().to_str().unwrap();
        let settings = HubSettings {
            offline: true,
            ..HubSettings::new(PathBuf::from("/nonexistent"))
        };
        assert_eq!(
            resolve_model_with(reference, &settings).unwrap(),
            dir.path()
        );
        assert_eq!(resolve_model(reference).unwrap(), dir.path());
    }

    #[test]
    fn fully_cached_model_resolves_to_its_snapshot_without_the_network() {
        let cache = FakeCache::new();
        let snapshot = cache.snapshot(COMMIT, &COMPLETE);
        cache.point("main", COMMIT);
        for offline in [true, false] {
            let resolved = resolve_model_with("owner/tiny", &cache.settings(offline)).unwrap();
            assert_eq!(resolved, snapshot);
        }
    }

    #[cfg(unix)]
    #[test]
    fn snapshot_files_may_be_symlinks_into_blobs() {
        let cache = FakeCache::new();
        let blobs = cache.repo_dir().join("blobs");
        fs::create_dir_all(&blobs).unwrap();
        let snapshot = cache.snapshot(COMMIT, &[]);
        for (name, contents) in COMPLETE {
            let blob = blobs.join(format!("blob-{name}"));
            fs::write(&blob, contents).unwrap();
            std::os::unix::fs::symlink(&blob, snapshot.join(name)).unwrap();
        }
        cache.point("main", COMMIT);
        let resolved = resolve_model_with("owner/tiny", &cache.settings(true)).unwrap();
        assert_eq!(resolved, snapshot);
    }

    #[test]
    fn revision_after_at_sign_uses_its_ref() {
        let cache = FakeCache::new();
        cache.snapshot(COMMIT, &COMPLETE);
        cache.point("main", COMMIT);
        let tagged = cache.snapshot("fedcba", &COMPLETE);
        cache.point("v1.0", "fedcba");
        let resolved = resolve_model_with("owner/tiny@v1.0", &cache.settings(true)).unwrap();
        assert_eq!(resolved, tagged);

        let pull_request = cache.snapshot("abc123", &COMPLETE);
        cache.point("refs/pr/1", "abc123");
        let resolved = resolve_model_with("owner/tiny@refs/pr/1", &cache.settings(true)).unwrap();
        assert_eq!(resolved, pull_request);
    }

    #[test]
    fn commit_hash_revision_needs_no_ref() {
        let cache = FakeCache::new();
        let snapshot = cache.snapshot(COMMIT, &COMPLETE);
        let reference = format!("owner/tiny@{COMMIT}");
        assert_eq!(
            resolve_model_with(&reference, &cache.settings(true)).unwrap(),
            snapshot
        );
    }

    #[test]
    fn sharded_snapshot_needs_every_shard() {
        let cache = FakeCache::new();
        let snapshot = cache.snapshot(
            COMMIT,
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                (INDEX_FILE, SHARD_INDEX),
                ("model-00001-of-00002.safetensors", ""),
            ],
        );
        cache.point("main", COMMIT);
        let error = resolve_model_with("owner/tiny", &cache.settings(true)).unwrap_err();
        assert!(matches!(error, ModelError::Hub { .. }));
        let message = error.to_string();
        assert!(
            message.contains(&format!(
                "(its snapshot {} lacks model-00002-of-00002.safetensors)",
                snapshot.display()
            )),
            "{message}"
        );

        fs::write(snapshot.join("model-00002-of-00002.safetensors"), "").unwrap();
        assert_eq!(
            resolve_model_with("owner/tiny", &cache.settings(true)).unwrap(),
            snapshot
        );
    }

    #[test]
    fn offline_and_not_cached_says_what_to_do() {
        let cache = FakeCache::new();
        let error = resolve_model_with("owner/tiny", &cache.settings(true)).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "Hugging Face Hub repo `owner/tiny`: revision `main` is not in the Hugging Face \
                 cache at {} and HF_HUB_OFFLINE is set; download it first or unset \
                 HF_HUB_OFFLINE (the cache is $HF_HUB_CACHE, else $HF_HOME/hub; no local path \
                 `owner/tiny` exists either)",
                cache.cache_dir().display()
            )
        );
    }

    #[test]
    fn offline_with_an_incomplete_snapshot_lists_the_missing_files() {
        let cache = FakeCache::new();
        cache.snapshot(COMMIT, &[("config.json", "{}")]);
        cache.point("main", COMMIT);
        let message = resolve_model_with("owner/tiny", &cache.settings(true))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains(
                "lacks tokenizer.json, model.safetensors (or model.safetensors.index.json))"
            ),
            "{message}"
        );
    }

    #[test]
    fn unknown_revision_is_not_cached() {
        let cache = FakeCache::new();
        cache.snapshot(COMMIT, &COMPLETE);
        cache.point("main", COMMIT);
        let message = resolve_model_with("owner/tiny@dev", &cache.settings(true))
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("revision `dev` is not in the Hugging Face cache"),
            "{message}"
        );
    }

    #[test]
    fn reference_that_is_neither_path_nor_id_is_not_found() {
        let cache = FakeCache::new();
        for reference in [
            "./missing/model",
            "a/b/c",
            "owner/na me",
            "owner/tiny@../../etc",
        ] {
            let error = resolve_model_with(reference, &cache.settings(false)).unwrap_err();
            assert!(
                matches!(error, ModelError::NotFound { .. }),
                "{reference}: {error:?}"
            );
            assert!(
                error
                    .to_string()
                    .contains(&format!("`{reference}` is neither")),
                "{error}"
            );
        }
    }

    #[test]
    fn hub_ids_follow_the_hub_rules() {
        let parsed = ModelRef::parse("HuggingFaceTB/SmolLM2-135M").unwrap();
        assert_eq!(
            (parsed.repo_id.as_str(), parsed.revision.as_str()),
            ("HuggingFaceTB/SmolLM2-135M", "main")
        );
        let parsed = ModelRef::parse("gpt2@v1.0").unwrap();
        assert_eq!(
            (parsed.repo_id.as_str(), parsed.revision.as_str()),
            ("gpt2", "v1.0")
        );
        for invalid in [
            "",
            "/abs/path",
            "owner/",
            "a/b/c",
            "owner/x--y",
            "owner/x..y",
            "owner/-x",
            "owner/x.",
            "owner/x@",
            "owner/x@refs//pr",
            "owner/x@..",
        ] {
            assert_eq!(ModelRef::parse(invalid), None, "{invalid}");
        }
    }

    #[test]
    fn offline_flag_reads_like_huggingface_hub() {
        for value in ["1", "true", "TRUE", "yes", "on", " 1 "] {
            assert!(is_truthy(value), "{value}");
        }
        for value in ["0", "false", "no", "", "2"] {
            assert!(!is_truthy(value), "{value}");
        }
    }
}
