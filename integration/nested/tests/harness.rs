//! The harness itself, on a real L1 boot: a command's output and exit status come back
//! as they were, the status cannot be forged by the command's output, and a CPU without
//! SVM is refused with the reason rather than run without KVM, and an L1 that stops
//! showing signs of life is ended early with the reason.

use std::path::Path;
use std::time::{Duration, Instant};

use cocoon_nested::testing::{
    guest_image_dir, l1_broke, missing, once_more_if, once_more_if_l1_broke, run_in_a_sound_l1,
};
use cocoon_nested::{L1Image, NestedError, L1};

fn l1(test: &str) -> Option<L1> {
    match L1Image::build(&guest_image_dir(), None) {
        Ok(image) => Some(L1 {
            timeout: Duration::from_secs(180),
            ..L1::new(image)
        }),
        Err(e) if e.is_unavailable() => {
            missing(test, &e.to_string());
            None
        }
        Err(e) => panic!("{test}: {e}"),
    }
}

#[test]
fn output_and_status_come_back_and_cannot_be_forged() {
    const TEST: &str = "output_and_status_come_back_and_cannot_be_forged";
    let Some(mut l1) = l1(TEST) else {
        return;
    };
    let out = run_in_a_sound_l1(
        &mut l1,
        TEST,
        "echo out; echo err >&2; test -c /dev/kvm && echo kvm; echo \"$GREETING\"; \
         echo 'COCOON-L1-STATUS 0'; exit 7",
        Path::new("/"),
        &[("GREETING".into(), "it's here".into())],
    )
    .unwrap();
    assert_eq!(out.status, 7, "{}", out.output_text());
    assert_eq!(
        out.output_text(),
        "out\nerr\nkvm\nit's here\nCOCOON-L1-STATUS 0\n"
    );
}

#[test]
fn a_cpu_without_svm_is_refused_with_the_reason() {
    const TEST: &str = "a_cpu_without_svm_is_refused_with_the_reason";
    let Some(mut l1) = l1(TEST) else {
        return;
    };
    l1.cpu = "EPYC,-svm".into();
    let err =
        run_in_a_sound_l1(&mut l1, TEST, "echo must-not-run", Path::new("/"), &[]).unwrap_err();
    assert!(matches!(err, NestedError::NoSvm(_)), "{err}");
    assert!(err.is_unavailable());
    assert!(
        err.to_string().contains("does not emulate AMD SVM"),
        "{err}"
    );
}

/// An L1 whose kernel panics under a command gets one fresh L1; a second panic is named
/// with the kernel's own reason.
#[test]
fn a_panicked_l1_gets_one_fresh_l1_then_is_named() {
    const TEST: &str = "a_panicked_l1_gets_one_fresh_l1_then_is_named";
    let Some(mut l1) = l1(TEST) else {
        return;
    };
    let mut runs = 0;
    let err = once_more_if_l1_broke(&mut l1, TEST, |l1| {
        runs += 1;
        l1.run(
            "echo c > /proc/sysrq-trigger; sleep 60; echo 'COCOON-L1-STATUS 0'",
            Path::new("/"),
            &[],
        )
    })
    .unwrap_err();
    assert_eq!(runs, 2, "{err}");
    let NestedError::L1Panic { panic, .. } = &err else {
        panic!("expected L1Panic, got: {err}");
    };
    assert!(panic.contains("sysrq triggered crash"), "{err}");
    assert!(!err.is_unavailable(), "{err}");
}

/// A quiet command is kept alive by L1's heartbeat; once the heartbeat stops (here: the
/// command kills it, standing in for a frozen L1) the run ends after the silence limit,
/// long before the timeout.
#[test]
fn a_quiet_command_lives_and_a_silent_l1_is_ended_early() {
    const TEST_SILENT: &str = "a_quiet_command_lives_and_a_silent_l1_is_ended_early";
    let Some(mut l1) = l1(TEST_SILENT) else {
        return;
    };
    l1.silence = Duration::from_secs(20);
    let script = "sleep 45; kill \"$(cat /run/cocoon-l1/heartbeat.pid)\" && sleep 170";
    let mut started = Instant::now();
    // The silence is what this test makes, so only a panicked L1 kernel gets a fresh
    // L1 (as `run_in_a_sound_l1` would give any test).
    let panicked =
        |e: &NestedError| l1_broke(e).filter(|_| matches!(e, NestedError::L1Panic { .. }));
    let err = once_more_if(&mut l1, TEST_SILENT, panicked, |l1| {
        started = Instant::now();
        l1.run(script, Path::new("/"), &[])
    })
    .unwrap_err();
    let took = started.elapsed();
    let NestedError::L1Silent { seconds, after, .. } = &err else {
        panic!("expected L1Silent, got: {err}");
    };
    assert!(*seconds >= 20, "{err}");
    // Silent only after the heartbeat was killed, 45 s into the command: not while
    // the command slept quietly with the heartbeat running.
    assert!(*after >= 45 + 20, "{err}");
    assert!(
        took < Duration::from_secs(150),
        "ended after {took:?}: {err}"
    );
    assert!(!err.is_unavailable(), "{err}");
}
