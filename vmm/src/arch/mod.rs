//! x86_64 specifics: the guest address map, boot protocols, CPUID, ACPI tables, MP table
//! and initial register state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod regs;
