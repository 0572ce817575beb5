//! The API's requests and replies, without a VM.

use super::*;

#[test]
fn memory_requests_parse_and_responses_carry_the_memory() {
    let r: ApiRequest = serde_json::from_str(r#"{"action":"memory"}"#).unwrap();
    assert!(matches!(r, ApiRequest::Memory));
    let r: ApiRequest =
        serde_json::from_str(r#"{"action":"resize_memory","requested_mib":256}"#).unwrap();
    assert!(matches!(r, ApiRequest::ResizeMemory { requested_mib: 256 }));
    for bad in [
        r#"{"action":"resize_memory"}"#,
        r#"{"action":"resize_memory","requested_mib":-1}"#,
        r#"{"action":"resize_memory","requested_mib":256,"node":0}"#,
    ] {
        assert!(serde_json::from_str::<ApiRequest>(bad).is_err(), "{bad}");
    }

    let resp = ApiResponse {
        ok: true,
        state: VmState::Running,
        error: None,
        stats: None,
        memory: Some(MemoryReport::from(MemStatus {
            region_bytes: 512 << 20,
            requested_bytes: 256 << 20,
            plugged_bytes: 2 << 20,
        })),
        disks: None,
    };
    let text = serde_json::to_string(&resp).unwrap();
    assert_eq!(
        text,
        r#"{"ok":true,"state":"running","memory":{"region_mib":512,"requested_mib":256,"plugged_mib":2}}"#
    );
    assert_eq!(serde_json::from_str::<ApiResponse>(&text).unwrap(), resp);
    // Without the device's figures the field is absent, as before.
    let plain: ApiResponse = serde_json::from_str(r#"{"ok":true,"state":"paused"}"#).unwrap();
    assert_eq!(plain.memory, None);
}

#[test]
fn memory_requests_need_a_running_vm() {
    let mut vmm = Vmm::new(VmmOptions::default()).unwrap();
    for req in [
        ApiRequest::Memory,
        ApiRequest::ResizeMemory { requested_mib: 2 },
    ] {
        let r = vmm.handle(req);
        assert!(!r.ok && r.memory.is_none(), "{r:?}");
        assert!(r
            .error
            .unwrap()
            .contains("not allowed in state NotConfigured"));
    }
}

#[test]
fn disk_requests_parse_and_need_a_running_vm_with_one_descriptor() {
    let r: ApiRequest =
        serde_json::from_str(r#"{"action":"attach_disk","slot":2,"serial":"s"}"#).unwrap();
    assert!(matches!(
        r,
        ApiRequest::AttachDisk { slot: 2, ref serial, read_only: false } if serial == "s"
    ));
    for bad in [
        r#"{"action":"attach_disk","slot":300,"serial":"s"}"#,
        r#"{"action":"attach_disk","serial":"s"}"#,
        r#"{"action":"detach_disk","slot":1,"force":true}"#,
    ] {
        assert!(serde_json::from_str::<ApiRequest>(bad).is_err(), "{bad}");
    }
    let mut vmm = Vmm::new(VmmOptions::default()).unwrap();
    let file: OwnedFd = tempfile::tempfile().unwrap().into();
    let r = vmm.handle_with(
        ApiRequest::AttachDisk {
            slot: 0,
            serial: "s".into(),
            read_only: false,
        },
        vec![file],
    );
    assert!(!r.ok && r.disks.is_none(), "{r:?}");
    assert!(r
        .error
        .unwrap()
        .contains("not allowed in state NotConfigured"));
}
