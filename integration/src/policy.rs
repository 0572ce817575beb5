//! Agent policies for tests: every call allowed, so a test's rules state what it denies.

/// Every call the agent polices, allowed: a test policy states what it denies.
pub const CALLS: &[&str] = &[
    "GetGuestDetails",
    "CreateSandbox",
    "DestroySandbox",
    "Shutdown",
    "UpdateInterface",
    "UpdateRoutes",
    "ListInterfaces",
    "ListRoutes",
    "CreateContainer",
    "StartContainer",
    "RemoveContainer",
    "PauseContainer",
    "ResumeContainer",
    "UpdateContainer",
    "StatsContainer",
    "ListPids",
    "SignalProcess",
    "WaitProcess",
    "TtyWinResize",
    "CloseStdin",
    "GetOomEvent",
    "OnlineCpus",
    "WriteStream",
];

/// A Rego policy allowing every call in `CALLS` and `more`, then `rules`.
pub fn allowing_all(more: &[&str], rules: &str) -> String {
    let mut rego = String::from("package agent_policy\n");
    for c in CALLS.iter().chain(more) {
        rego.push_str(&format!("default {c}Request := true\n"));
    }
    rego.push_str(rules);
    rego
}
