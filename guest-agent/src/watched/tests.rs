use std::os::fd::OwnedFd;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

use super::*;

/// A volume as kubelet's atomic writer lays it out: the files in a `..<ts>` directory,
/// `..data` linking to it, and a link per key to `..data/<key>`.
fn write_volume(root: &Path, ts: &str, files: &[(&str, &str)]) {
    let dir = root.join(ts);
    std::fs::create_dir(&dir).unwrap();
    for (k, v) in files {
        std::fs::write(dir.join(k), v).unwrap();
        std::fs::set_permissions(dir.join(k), std::fs::Permissions::from_mode(0o640)).unwrap();
    }
    let tmp = root.join("..data_tmp");
    std::os::unix::fs::symlink(ts, &tmp).unwrap();
    std::fs::rename(&tmp, root.join("..data")).unwrap();
    for (k, _) in files {
        let link = root.join(k);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{k}"), link).unwrap();
        }
    }
}

fn src_fd(p: &Path) -> OwnedFd {
    open_dir(nix::fcntl::AT_FDCWD, p.as_os_str()).unwrap()
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn a_volume_is_copied_with_its_links_and_modes() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    write_volume(&src, "..2026_01_01", &[("app.conf", "v1"), ("other", "x")]);
    // A link out of the volume is copied as a link, never followed.
    std::os::unix::fs::symlink("/etc/hostname", src.join("escape")).unwrap();
    let m = Mirror::start(src_fd(&src), &dst)
        .unwrap()
        .expect("within bounds");
    assert_eq!(read(&dst.join("app.conf")), "v1");
    assert_eq!(
        std::fs::read_link(dst.join("..data")).unwrap(),
        Path::new("..2026_01_01")
    );
    assert_eq!(
        std::fs::read_link(dst.join("escape")).unwrap(),
        Path::new("/etc/hostname")
    );
    let mode = std::fs::metadata(dst.join("..2026_01_01/app.conf"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o640);
    assert_eq!(m.dst(), dst);
}

/// kubelet's update, replayed: the new files are there before `..data` moves to them
/// (a rename, which inotify reports as IN_MOVED_TO), and the old directory goes.
#[test]
fn an_atomic_update_is_replayed_in_the_writers_order() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    write_volume(&src, "..2026_01_01", &[("app.conf", "v1")]);
    let mut m = Mirror::start(src_fd(&src), &dst).unwrap().unwrap();
    assert!(!m.refresh().unwrap(), "nothing changed");

    let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
    inotify
        .add_watch(&dst, AddWatchFlags::IN_MOVED_TO | AddWatchFlags::IN_CREATE)
        .unwrap();
    write_volume(&src, "..2026_01_02", &[("app.conf", "v2")]);
    std::fs::remove_dir_all(src.join("..2026_01_01")).unwrap();
    assert!(m.refresh().unwrap());
    assert_eq!(read(&dst.join("app.conf")), "v2");
    assert!(!dst.join("..2026_01_01").exists(), "the old files are gone");
    let events = inotify.read_events().unwrap();
    let names: Vec<_> = events
        .iter()
        .map(|e| (e.name.clone().unwrap_or_default(), e.mask))
        .collect();
    let created = names
        .iter()
        .position(|(n, _)| n == "..2026_01_02")
        .expect("the new directory's event");
    let swapped = names
        .iter()
        .position(|(n, m)| n == "..data" && m.contains(AddWatchFlags::IN_MOVED_TO))
        .unwrap_or_else(|| panic!("no IN_MOVED_TO for ..data: {names:?}"));
    assert!(created < swapped, "{names:?}");
}

#[test]
fn a_volume_over_the_bounds_is_not_copied() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    for i in 0..=MAX_ENTRIES {
        std::fs::write(src.join(i.to_string()), "").unwrap();
    }
    assert!(Mirror::start(src_fd(&src), &dst).unwrap().is_none());
    assert!(!dst.exists());
    // Grown past them later: the copy keeps its state and says why.
    let src2 = d.path().join("src2");
    std::fs::create_dir(&src2).unwrap();
    std::fs::write(src2.join("a"), "1").unwrap();
    let mut m = Mirror::start(src_fd(&src2), &d.path().join("dst2"))
        .unwrap()
        .unwrap();
    std::fs::write(src2.join("big"), vec![0u8; (MAX_BYTES + 1) as usize]).unwrap();
    assert!(m.refresh().unwrap_err().to_string().contains("over"));
    assert_eq!(read(&d.path().join("dst2/a")), "1");
}

#[test]
fn the_spec_is_pointed_at_the_copies_it_names() {
    let d = tempfile::tempdir().unwrap();
    let shared = d.path().join("shared");
    let src = shared.join("c1/mounts/1");
    std::fs::create_dir_all(&src).unwrap();
    write_volume(&src, "..1", &[("k", "v")]);
    let outside = d.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    let mut spec = serde_json::json!({"mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/etc/config", "type": "bind", "source": src, "options": ["rbind", "ro"]},
        {"destination": "/data", "type": "bind", "source": src, "options": ["rbind"]},
        {"destination": "/rw", "type": "bind", "source": src, "options": ["rbind"]},
        {"destination": "/elsewhere", "type": "bind", "source": outside, "options": ["rbind", "ro"]},
    ]});
    let dir = d.path().join("watched/c1");
    let named = ["/etc/config", "/rw", "/elsewhere"].map(String::from);
    let mirrors = provide(&shared, &dir, &named, &mut spec);
    assert_eq!(mirrors.len(), 1, "only the read-only bind of the share");
    assert_eq!(
        spec["mounts"][1]["source"],
        dir.join("1").to_string_lossy().as_ref()
    );
    assert_eq!(spec["mounts"][3]["source"], src.to_string_lossy().as_ref());
    assert_eq!(
        spec["mounts"][4]["source"],
        outside.to_string_lossy().as_ref()
    );
    assert_eq!(read(&dir.join("1/k")), "v");
}

/// A source whose directory is swapped for a link (to the guest's own files) is not
/// followed: the copy keeps its state.
#[test]
fn a_directory_swapped_for_a_link_is_not_followed() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    write_volume(&src, "..1", &[("k", "v1")]);
    let private = d.path().join("private");
    std::fs::create_dir(&private).unwrap();
    std::fs::write(private.join("k"), "secret").unwrap();
    let mut m = Mirror::start(src_fd(&src), &dst).unwrap().unwrap();
    // ..1 becomes a link to a directory outside, with a new mtime'd file list.
    std::fs::remove_dir_all(src.join("..1")).unwrap();
    std::os::unix::fs::symlink(&private, src.join("..1")).unwrap();
    m.refresh().unwrap();
    assert_eq!(
        std::fs::read_link(dst.join("..1")).unwrap(),
        private,
        "copied as a link"
    );
    // The copy never holds the private file's bytes as its own file.
    let held = scan(&m.dst, None).unwrap().unwrap();
    assert!(!held.contains_key(Path::new("..1/k")), "{held:?}");
}

/// A link in the source named like a file the copy writes later is never written
/// through, and a replay that failed midway is finished by the next.
#[test]
fn links_in_the_copy_are_never_written_through() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    let victim = d.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    std::fs::write(src.join("x"), "1").unwrap();
    std::os::unix::fs::symlink(&victim, src.join(".cocoon-tmp-x")).unwrap();
    let mut m = Mirror::start(src_fd(&src), &dst).unwrap().unwrap();
    // x becomes a directory holding a file, then a link to the victim's directory
    // with a file of the victim's name in the old tree.
    std::fs::remove_file(src.join("x")).unwrap();
    std::fs::create_dir(src.join("x")).unwrap();
    std::fs::write(src.join("x/victim"), "2").unwrap();
    m.refresh().unwrap();
    assert_eq!(read(&dst.join("x/victim")), "2");
    std::fs::remove_dir_all(src.join("x")).unwrap();
    std::os::unix::fs::symlink(d.path(), src.join("x")).unwrap();
    m.refresh().unwrap();
    assert_eq!(read(&victim), "untouched");
    assert!(dst.join("x").is_symlink());
    // A half-done copy (a stray entry, a missing file) is put right by the next look.
    std::fs::write(dst.join("stray"), "").unwrap();
    std::fs::write(src.join("new"), "3").unwrap();
    m.refresh().unwrap();
    assert!(!dst.join("stray").exists());
    assert_eq!(read(&dst.join("new")), "3");
}

/// A copy that holds far more than any source may (replays that kept failing) is
/// emptied and made again at the next change.
#[test]
fn a_copy_grown_past_all_bounds_is_made_again() {
    let d = tempfile::tempdir().unwrap();
    let (src, dst) = (d.path().join("src"), d.path().join("dst"));
    std::fs::create_dir(&src).unwrap();
    write_volume(&src, "..1", &[("k", "v1")]);
    let mut m = Mirror::start(src_fd(&src), &dst).unwrap().unwrap();
    std::fs::create_dir(dst.join("junk")).unwrap();
    for i in 0..4 * MAX_ENTRIES + 1 {
        std::fs::write(dst.join("junk").join(i.to_string()), "").unwrap();
    }
    write_volume(&src, "..2", &[("k", "v2")]);
    assert!(m.refresh().unwrap());
    assert!(!dst.join("junk").exists());
    assert_eq!(read(&dst.join("k")), "v2");
    assert_eq!(read(&dst.join("..1/k")), "v1", "still in the source");
}
