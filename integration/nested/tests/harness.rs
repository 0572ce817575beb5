//! The harness itself, on a real L1 boot: a command's output and exit status come back
//! as they were, the status cannot be forged by the command's output, and a CPU without
//! SVM is refused with the reason rather than run without KVM.

use std::path::Path;
use std::time::Duration;

use cocoon_nested::testing::{guest_image_dir, missing};
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
    let Some(l1) = l1("output_and_status_come_back_and_cannot_be_forged") else {
        return;
    };
    let out = l1
        .run(
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
    let Some(mut l1) = l1("a_cpu_without_svm_is_refused_with_the_reason") else {
        return;
    };
    l1.cpu = "EPYC,-svm".into();
    let err = l1
        .run("echo must-not-run", Path::new("/"), &[])
        .unwrap_err();
    assert!(matches!(err, NestedError::NoSvm(_)), "{err}");
    assert!(err.is_unavailable());
    assert!(
        err.to_string().contains("does not emulate AMD SVM"),
        "{err}"
    );
}
