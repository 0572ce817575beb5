//! The pod's agent policy (init-data with Rego, `io.cocoon.init-data`), enforced by the
//! agent in a real guest: a call the policy denies is refused there, with the agent's
//! reason, whatever the host (here: containerd and the shim, through `ctr`) asks.

mod ctr_common;

use base64::Engine;
use ctr_common::*;

/// The `io.cocoon.init-data` annotation for a policy of `rules` on top of every call
/// allowed (`cocoon_integration::policy::CALLS`).
fn annotation(rules: &str) -> String {
    let rego = cocoon_integration::policy::allowing_all(&[], rules);
    let toml = format!(
        "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"policy.rego\" = '''\n{rego}'''\n"
    );
    format!(
        "io.cocoon.init-data={}",
        base64::engine::general_purpose::STANDARD.encode(toml)
    )
}

/// Exec is allowed for `true` only; the agent, not the shim, refuses the rest.
#[test]
fn the_agent_refuses_an_exec_its_policy_denies() {
    let env = env();
    let ann = annotation(
        "default ReadStreamRequest := true\n\
         default ExecProcessRequest := false\n\
         ExecProcessRequest if { input.process.args == [\"true\"] }\n",
    );
    run_detached(
        &env,
        "pol-exec",
        &["--annotation", &ann],
        &["sh", "-c", "while true; do sleep 0.1; done"],
    );
    ctr_ok(
        &env,
        &["task", "exec", "--exec-id", "allowed", "pol-exec", "true"],
    );
    let denied = env.containerd.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "denied",
        "pol-exec",
        "sh",
        "-c",
        "echo hi",
    ]);
    let err = String::from_utf8_lossy(&denied.stderr);
    assert!(
        !denied.status.success()
            && err.contains("ExecProcessRequest is blocked by the pod's agent policy"),
        "{}",
        show(&denied)
    );
    assert!(!String::from_utf8_lossy(&denied.stdout).contains("hi"));
    kill_delete_clean(&env, "pol-exec");
}

/// With `ReadStream` denied the host never sees the container's output; the container
/// still runs to its end (the guest drains what nobody may read).
#[test]
fn a_policy_can_keep_container_output_from_the_host() {
    let env = env();
    let ann =
        annotation("default ExecProcessRequest := true\ndefault ReadStreamRequest := false\n");
    let out = ctr_run(
        &env,
        COCOON,
        "pol-out",
        &["--annotation", &ann],
        &[
            "sh",
            "-c",
            "seq 1 20000; echo secret; echo secret >&2; exit 7",
        ],
    );
    assert_eq!(out.status.code(), Some(7), "{}", show(&out));
    assert!(
        out.stdout.is_empty() && out.stderr.is_empty(),
        "{}",
        show(&out)
    );
    assert_clean(&env);
}

/// A malformed init-data is refused before any VM starts, naming the annotation.
#[test]
fn malformed_init_data_is_refused_naming_it() {
    let env = env();
    let bad = format!(
        "io.cocoon.init-data={}",
        base64::engine::general_purpose::STANDARD
            .encode("version = \"9\"\nalgorithm = \"sha384\"\n")
    );
    let out = ctr_run(&env, COCOON, "pol-bad", &["--annotation", &bad], &["true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("io.cocoon.init-data") && err.contains("version"),
        "{}",
        show(&out)
    );
    assert_clean(&env);
}

/// A policy that decides containers by their pulled image (`CreateContainerImageRequest`)
/// refuses a container on a root the host made: a host cannot skip the decision by asking
/// for no pull.
#[test]
fn a_policy_pinning_pulled_images_refuses_a_root_the_host_made() {
    let env = env();
    let ann = annotation("default CreateContainerImageRequest := false\n");
    let out = ctr_run(
        &env,
        COCOON,
        "pol-pinned",
        &["--annotation", &ann],
        &["true"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("CreateContainerImageRequest")
            && err.contains("asks for none"),
        "{}",
        show(&out)
    );
    let _ = env.containerd.ctr(&["container", "delete", "pol-pinned"]);
    assert_clean(&env);
}

/// An agent in confidential mode (`cocoon.confidential` on the guest's command line; here
/// without hardware, which only changes the agent) serves nothing before init-data, and
/// with init-data that carries no policy it enforces the built-in confidential one, which
/// refuses a container on a root filesystem the host shares.
#[test]
fn a_confidential_agent_waits_for_init_data_then_applies_its_default_policy() {
    let env = env_edited("", "", |c| {
        c.vm.kernel_params = "cocoon.confidential".into()
    });
    let out = ctr_run(&env, COCOON, "conf-none", &[], &["true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("serves no call before its init-data"),
        "{}",
        show(&out)
    );
    let _ = env.containerd.ctr(&["container", "delete", "conf-none"]);

    let bare = format!(
        "io.cocoon.init-data={}",
        base64::engine::general_purpose::STANDARD
            .encode("version = \"0.1.0\"\nalgorithm = \"sha384\"\n")
    );
    // The built-in policy refuses a root filesystem the host shares: a ctr pod (no
    // network to pull over) cannot start. Exec, the debug console and evidence against
    // a running confidential pod are in `cri_pull.rs`.
    let out = ctr_run(
        &env,
        COCOON,
        "conf-default",
        &["--annotation", &bare],
        &["true"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CreateContainerRequest is blocked"),
        "{}",
        show(&out)
    );
    let _ = env.containerd.ctr(&["container", "delete", "conf-default"]);
    assert_clean(&env);
}

/// An agent told it runs in a TEE (`cocoon.confidential=sev-snp` on its command line, which
/// a real launch measures) takes init-data only if its own hardware evidence binds it.
/// This guest has none (QEMU/TCG): the init-data is refused naming what the evidence
/// check met, the pod does not start, and nothing of it is left.
#[test]
fn a_tee_agent_without_evidence_refuses_the_init_data() {
    let env = env_edited("", "", |c| {
        c.vm.kernel_params = "cocoon.confidential=sev-snp".into()
    });
    let bare = format!(
        "io.cocoon.init-data={}",
        base64::engine::general_purpose::STANDARD
            .encode("version = \"0.1.0\"\nalgorithm = \"sha384\"\n")
    );
    let out = ctr_run(
        &env,
        COCOON,
        "tee-none",
        &["--annotation", &bare],
        &["true"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("refused as: {err}");
    assert!(
        !out.status.success()
            && err.contains("init-data refused against the guest's evidence")
            && err.contains("/sys/kernel/config/tsm/report"),
        "{}",
        show(&out)
    );
    let _ = env.containerd.ctr(&["container", "delete", "tee-none"]);
    assert_clean(&env);
}

/// A pod asking for a confidential VM is refused, never started unprotected, and the
/// refusal names what this host lacks (here: SEV firmware, and a QEMU with the object).
#[test]
fn a_confidential_pod_is_refused_with_what_the_host_lacks() {
    let env = env();
    for (kind, object) in [("sev-snp", "sev-snp-guest"), ("tdx", "tdx-guest")] {
        let id = format!("conf-{kind}");
        let out = ctr_run(
            &env,
            COCOON,
            &id,
            &["--annotation", &format!("io.cocoon.confidential={kind}")],
            &["true"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success()
                && err.contains("refused rather than started unprotected")
                && err.contains(&format!("has no {object} object")),
            "{}",
            show(&out)
        );
        let _ = env.containerd.ctr(&["container", "delete", &id]);
    }
    assert_clean(&env);
}

/// A container asking for secrets from the pod's key broker (`io.cocoon.kbs-secrets`)
/// does not start without them: with no broker named in the init-data, or, here under
/// TCG, with no TEE evidence to attest with, the agent refuses its creation and says why.
#[test]
fn a_container_whose_secrets_cannot_be_had_does_not_start() {
    let env = env();
    let secrets = "io.cocoon.kbs-secrets=key=default/key/one";
    let with_broker = format!(
        "io.cocoon.init-data={}",
        base64::engine::general_purpose::STANDARD.encode(
            "version = \"0.1.0\"\nalgorithm = \"sha384\"\n[data]\n\"aa.toml\" = '''\n\
             [token_configs.kbs]\nurl = \"http://127.0.0.1:9\"\n'''\n"
        )
    );
    let no_broker = annotation("");
    for (name, init, says) in [
        ("kbs-none", no_broker.as_str(), "no key broker"),
        (
            "kbs-no-tee",
            with_broker.as_str(),
            "this guest has no TEE evidence",
        ),
    ] {
        let out = ctr_run(
            &env,
            COCOON,
            name,
            &["--annotation", init, "--annotation", secrets],
            &["true"],
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says) && err.contains("\"key\""),
            "{name}: {}",
            show(&out)
        );
        let _ = env.containerd.ctr(&["container", "delete", name]);
    }
    // A malformed request is named before anything is fetched.
    let out = ctr_run(
        &env,
        COCOON,
        "kbs-bad",
        &[
            "--annotation",
            &with_broker,
            "--annotation",
            "io.cocoon.kbs-secrets=key=../etc/x",
        ],
        &["true"],
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not name=repository/type/tag"),
        "{}",
        show(&out)
    );
    let _ = env.containerd.ctr(&["container", "delete", "kbs-bad"]);
    assert_clean(&env);
}
