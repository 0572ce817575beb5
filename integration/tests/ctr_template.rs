//! Pods restored from a VM template (`[vm] templates`, cocoon-vmm): `ctr run` against
//! runc as for booted pods, each pod's own clock, and nothing left once they are gone
//! but the template itself. Needs hardware KVM, so here it reruns inside L1.

mod ctr_common;

use cocoon_nested::testing::{hardware_kvm, Place, NOTE_PREFIX};
use cocoon_shim::shimv2::timings;
use ctr_common::*;

#[test]
fn cocoon_vmm_pods_start_from_a_vm_template() {
    if hardware_kvm("cocoon_vmm_pods_start_from_a_vm_template") == Place::Done {
        return;
    }
    let env = env_edited("hypervisor = \"cocoon-vmm\"\n", "", |c| {
        c.vm.templates = true
    });
    // The first pod makes the template (one boot) and is restored from it; so is the
    // second, which finds it made.
    for name in ["tpl-first", "tpl-second"] {
        eprintln!("step: {name}");
        let out = same_in(
            &env,
            name,
            &["--env", "FOO=bar", "--cwd", "/tmp"],
            &["sh", "-c", "echo \"$FOO\"; pwd; echo err >&2; exit 3"],
        );
        assert_eq!(out.stdout, b"bar\n/tmp\n");
    }
    // The guest's wall clock is the host's, not the template's (saved a while ago):
    // the sandbox set-up steps it.
    eprintln!("step: clock");
    let host_before = now_s();
    let out = ctr_run(&env, COCOON, "tpl-clock", &[], &["date", "+%s"]);
    let host_after = now_s();
    assert!(out.status.success(), "{}", show(&out));
    let guest: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(
        (host_before.saturating_sub(1)..=host_after + 1).contains(&guest),
        "guest clock {guest}, host {host_before}..{host_after}"
    );

    let records: Vec<_> = timings::read(&env.run_dir)
        .into_iter()
        .filter(|r| r.kind == "container" && r.container_id.ends_with("-cocoon"))
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r.from_template), "{records:?}");
    for r in &records {
        eprintln!(
            "{NOTE_PREFIX}{}: VM launch {:.0} ms, agent ready {:.0} ms after",
            r.container_id, r.vm_launch_ms, r.agent_ready_ms
        );
    }
    let templates = env.run_dir.join(cocoon_shim::hypervisor::template::DIR);
    let made: Vec<_> = std::fs::read_dir(&templates)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("vm.json").is_file())
        .collect();
    assert_eq!(made.len(), 1, "one template for one shape");
    // `cocoon templates` lists it as usable; a stale one beside it (no shape record,
    // as one made before records were kept) goes with `--prune`, the real one stays.
    let key = made[0].file_name().to_string_lossy().into_owned();
    std::fs::create_dir(templates.join("0stale")).unwrap();
    std::fs::write(templates.join("0stale").join("vm.json"), "{}").unwrap();
    let cli = |args: &[&str]| {
        let out = cocoon_cli(&env).args(args).output().unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let listed = cli(&["templates"]);
    let line = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} not in:\n{text}"))
            .to_string()
    };
    assert!(line(&listed, &key).ends_with("usable"), "{listed}");
    assert!(line(&listed, "0stale").contains("stale"), "{listed}");
    let pruned = cli(&["templates", "--prune"]);
    assert!(line(&pruned, "0stale").ends_with("removed"), "{pruned}");
    assert!(line(&pruned, &key).ends_with("usable"), "{pruned}");
    assert!(!templates.join("0stale").exists());
    assert!(templates.join(&key).join("vm.json").is_file());
    // The template VM and its virtiofsd ended once it was saved; the pods' processes
    // end with them.
    assert_clean(&env);
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}
