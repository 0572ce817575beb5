//! The pod share against a hostile guest: root in the guest (the debug console plays
//! the attacker, outside every container) tries to plant links and names in the share
//! and to write through read-only volumes, including a mount nested in one. Nothing
//! may reach the host beyond the rw volume, and the pod must still go away cleanly,
//! leaving the volumes' data.

mod ctr_common;

use ctr_common::*;
use std::path::Path;

const ATTACK: &str = r#"
S=/run/cocoon/shared/victim
for d in $S/mounts/*; do
  [ -f $d/marker-ro ] && RO=$d
  [ -f $d/marker-rw ] && RW=$d
done
[ -n "$RO" ] && [ -n "$RW" ] || { echo "volumes not found"; exit 1; }
try() { if "$@" 2>/dev/null; then echo "ALLOWED: $*"; else echo "refused: $*"; fi; }
try ln -s / /run/cocoon/shared/planted
try ln -s /etc $S/mounts/evil
try mkdir $S/newdir
try mv $S/mounts $S/mounts-moved
try touch $S/rootfs-sibling
try touch $RO/x
try touch $RO/nested/x
try rm $RO/marker-ro
try touch $RW/written-by-guest
"#;

#[test]
fn a_hostile_guest_cannot_reach_past_its_share() {
    let env = env_with("", "[debug]\nconsole = true\n");
    let t = tempfile::tempdir().unwrap();
    let (rw, ro) = (t.path().join("rw"), t.path().join("ro"));
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(ro.join("nested")).unwrap();
    std::fs::write(rw.join("marker-rw"), "").unwrap();
    std::fs::write(ro.join("marker-ro"), "").unwrap();
    // A mount inside the read-only volume: read-only must reach it too.
    let _nested = TmpfsMount::on(&ro.join("nested"));
    std::fs::write(ro.join("nested/marker-nested"), "").unwrap();

    let rw_mount = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
    let ro_mount = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let mounts = ["--mount", &rw_mount, "--mount", &ro_mount];
    run_detached(&env, "victim", &mounts, &["sleep", "1000"]);
    // The script goes to the guest's shell on its stdin.
    let o = cocoon_debug(&env, "victim", &["sh"], ATTACK.as_bytes());
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let allowed: Vec<&str> = out.lines().filter(|l| l.starts_with("ALLOWED")).collect();
    assert_eq!(
        allowed.len(),
        1,
        "only the rw volume takes writes:\n{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(allowed[0].contains("written-by-guest"), "{out}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("refused")).count(),
        8,
        "{out}"
    );

    // On the host: the rw volume got its file, nothing else moved.
    assert!(rw.join("written-by-guest").exists());
    assert!(ro.join("marker-ro").exists());
    assert!(!ro.join("x").exists() && !ro.join("nested/x").exists());
    let planted = cocoon_integration::processes_mentioning("planted");
    assert!(planted.is_empty(), "{planted:?}");
    for entry in walk(&env.run_dir) {
        let name = entry.file_name().unwrap_or_default().to_string_lossy();
        assert!(
            ![
                "planted",
                "evil",
                "newdir",
                "mounts-moved",
                "rootfs-sibling"
            ]
            .contains(&name.as_ref()),
            "the guest made {} on the host",
            entry.display()
        );
    }

    kill_delete_clean(&env, "victim");
    // The pod's removal left the volumes' data alone.
    for f in [
        rw.join("marker-rw"),
        rw.join("written-by-guest"),
        ro.join("marker-ro"),
        ro.join("nested/marker-nested"),
    ] {
        assert!(f.exists(), "{} is gone", f.display());
    }
}

/// Every path under `dir`, not following links (nor into the volumes' mounts: they
/// are checked on their own).
fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let p = e.path();
        out.push(p.clone());
        if e.file_type().is_ok_and(|t| t.is_dir()) && !p.ends_with("rootfs") {
            out.extend(walk(&p));
        }
    }
    out
}
