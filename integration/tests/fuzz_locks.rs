//! Each cargo-fuzz workspace builds the versions the main workspace builds: its
//! Cargo.lock holds no version of a crate that the main Cargo.lock lacks
//! (`scripts/fuzz-locks.sh` writes them). CI's fuzz stage then builds what every other
//! stage built, not whatever crates.io had newest that day.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What only the fuzz workspaces need: libFuzzer, its helpers, and each one's own package.
const FUZZ_ONLY: [&str; 3] = ["libfuzzer-sys", "arbitrary", "jobserver"];

/// Every (name, versions) of a Cargo.lock.
fn packages(lock: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let text = std::fs::read_to_string(lock)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/fuzz-locks.sh writes it)", lock.display()));
    let doc: toml::Value =
        toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", lock.display()));
    let mut all: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for p in doc["package"].as_array().expect("a [[package]] list") {
        let name = p["name"].as_str().expect("a package name");
        let version = p["version"].as_str().expect("a package version");
        all.entry(name.into()).or_default().insert(version.into());
    }
    all
}

#[test]
fn every_fuzz_lock_follows_the_main_lock() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let main = packages(&root.join("Cargo.lock"));
    // Every crate's fuzz workspace, found as scripts/fuzz-locks.sh finds them: a new one
    // without a lock fails here rather than resolving afresh in CI.
    let mut workspaces: Vec<String> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| root.join(name).join("fuzz/Cargo.toml").is_file())
        .collect();
    workspaces.sort();
    assert!(
        workspaces.len() >= 4,
        "fewer fuzz workspaces than the four known: {workspaces:?}"
    );
    let mut drift = Vec::new();
    for ws in &workspaces {
        let lock = root.join(ws).join("fuzz/Cargo.lock");
        let fuzz = packages(&lock);
        assert!(
            fuzz.contains_key("libfuzzer-sys"),
            "{ws}/fuzz/Cargo.lock has no libfuzzer-sys: not a fuzz workspace's lock"
        );
        for (name, versions) in &fuzz {
            if FUZZ_ONLY.contains(&name.as_str()) || name.ends_with("-fuzz") {
                continue;
            }
            for v in versions {
                if !main.get(name).is_some_and(|m| m.contains(v)) {
                    drift.push(format!("{ws}/fuzz: {name} {v}"));
                }
            }
        }
    }
    assert!(
        drift.is_empty(),
        "fuzz locks hold versions the main Cargo.lock does not (run scripts/fuzz-locks.sh \
         and commit): {drift:?}"
    );
}
