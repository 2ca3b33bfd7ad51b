"""What the worker does to itself before it touches any input: hard resource limits and a seccomp
deny-list (libseccomp via ctypes). Both are inherited by anything it spawns and cannot be undone by
the worker: hard limits only go down without CAP_SYS_RESOURCE, and seccomp filters only stack.

Stdlib only; the supervisor verifies the result from outside (/proc/<pid>/limits and status)."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import resource
from typing import Any

# name → resource constant. "cpu" is a lifetime budget: the per-request budget is the soft limit.
RLIMITS: dict[str, int] = {
    "as": resource.RLIMIT_AS,
    "cpu": resource.RLIMIT_CPU,
    "nproc": resource.RLIMIT_NPROC,
    "fsize": resource.RLIMIT_FSIZE,
    "nofile": resource.RLIMIT_NOFILE,
    "core": resource.RLIMIT_CORE,
}

# Denied with EPERM: debugging other processes, kernel/module/mount/namespace control, key rings,
# handle-based opens (the classic container escape) and userfaultfd (a kernel-exploit helper).
DENIED_SYSCALLS = (
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
    "bpf",
    "perf_event_open",
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "keyctl",
    "add_key",
    "request_key",
    "unshare",
    "setns",
    "open_by_handle_at",
    "name_to_handle_at",
    "userfaultfd",
    "acct",
    "quotactl",
    "syslog",
    "iopl",
    "ioperm",
)
# clone() with any of these flags would make a new namespace; unshare/setns are denied above.
_CLONE_NS_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000)

_SCMP_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
# A pid no process can have (above the kernel's PID_MAX_LIMIT).
IMPOSSIBLE_PID = 0x7FFFFFFF


def _scmp_act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def rlimits_apply(limits: dict[str, int]) -> dict[str, int]:
    """Set soft = hard = value for each named limit; returns the ones that took."""
    applied: dict[str, int] = {}
    for name, value in limits.items():
        if name not in RLIMITS or value < 0:
            continue
        kind = RLIMITS[name]
        _, hard = resource.getrlimit(kind)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            continue
        applied[name] = value
    return applied


def cpu_seconds_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_budget_set(seconds: float | None) -> None:
    """Lower the soft CPU limit to what this request may use (SIGXCPU beyond it); None restores it
    to the lifetime hard limit. Soft limits may move freely below the hard one."""
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = hard
    if seconds is not None:
        wanted = int(cpu_seconds_used() + max(1.0, seconds)) + 1
        soft = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def seccomp_install() -> str:
    """Load the deny-list for this process and everything it starts. Returns "" or why not."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        return f"libseccomp not available: {exc}"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.restype = ctypes.c_int
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.restype = ctypes.c_int
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.restype = ctypes.c_int
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(_SCMP_ACT_ALLOW)
    if not ctx:
        return "seccomp_init failed"
    try:
        deny = _scmp_act_errno(errno.EPERM)
        for syscall in DENIED_SYSCALLS:
            number = lib.seccomp_syscall_resolve_name(syscall.encode())
            if number < 0:
                continue  # not on this architecture
            if (rc := lib.seccomp_rule_add_array(ctx, deny, number, 0, None)) < 0:
                return f"seccomp rule for {syscall} failed ({rc})"
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in _CLONE_NS_FLAGS:
            cmp = _ArgCmp(arg=0, op=_SCMP_CMP_MASKED_EQ, datum_a=flag, datum_b=flag)
            if (rc := lib.seccomp_rule_add_array(ctx, deny, clone, 1, ctypes.byref(cmp))) < 0:
                return f"seccomp rule for clone flag {flag:#x} failed ({rc})"
        # clone3 passes its flags in memory a filter cannot read; ENOSYS makes libc fall back to clone.
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 >= 0:
            lib.seccomp_rule_add_array(ctx, _scmp_act_errno(errno.ENOSYS), clone3, 0, None)
        if (rc := lib.seccomp_load(ctx)) < 0:
            return f"seccomp_load failed ({rc})"
    finally:
        lib.seccomp_release(ctx)
    return ""


def seccomp_check() -> str:
    """ptrace of a pid that cannot exist: ESRCH from the kernel, EPERM only from our filter."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.ptrace.restype = ctypes.c_long
    libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
    if libc.ptrace(16, IMPOSSIBLE_PID, None, None) == 0:
        return "OK"
    return errno.errorcode.get(ctypes.get_errno(), "?")


def confine_self(config: dict[str, Any]) -> dict[str, Any]:
    """Everything at once, in the order that matters: limits first (libseccomp allocates), then
    the filter. Returns what happened for the ready message."""
    applied = rlimits_apply({str(k): int(v) for k, v in dict(config.get("rlimits", {})).items()})
    seccomp_error = seccomp_install() if config.get("seccomp", True) else "disabled"
    return {"rlimits": applied, "seccomp_error": seccomp_error, "seccomp_ptrace": seccomp_check()}
