// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * efuse's kernel-side view of one FUSE mount, from tracepoints only (this
 * kernel has no kprobes or fentry):
 *
 *  - fuse:fuse_request_send / fuse:fuse_request_end: per-opcode request and
 *    error counts and send-to-end latency as log2 histograms, for the one
 *    connection the loader configures (other mounts are ignored);
 *  - sched:sched_switch: context switches of the daemon's threads;
 *  - raw_syscalls:sys_enter: syscalls made by one chosen process.
 *
 * Tracepoint records are read at the offsets of
 * /sys/kernel/tracing/events/<group>/<event>/format (checked on Linux 6.18).
 * FORGET, BATCH_FORGET and INTERRUPT take the kernel's forget/interrupt
 * queues and never pass fuse_request_send: they are not counted here.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>

#define MAX_OPCODES 64 /* FUSE opcodes are 1..52; 63 collects anything larger */
#define BUCKETS 64     /* bucket b counts latencies in [2^b, 2^(b+1)) ns */
#define MAX_SYSCALLS 512

struct config {
	__u32 connection;   /* dev_t of the mount's FUSE connection; 0 = not yet known */
	__u32 daemon_tgid;  /* the daemon process, for context switches */
	__u32 syscall_tgid; /* whose syscalls to count; 0 = nobody */
	__u32 pad;
};

struct pending {
	__u64 start_ns;
	__u32 opcode;
	__u32 pad;
};

struct switches {
	__u64 voluntary;   /* the thread blocked (waited for a request, a lock, I/O) */
	__u64 involuntary; /* the thread was preempted while runnable */
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} config SEC(".maps");

/* unique -> when it was sent; removed at end. Bounded: a full map drops
 * latency (counted in `lost`) but never a request count. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct pending);
} pending SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_OPCODES);
	__type(key, __u32);
	__type(value, __u64);
} op_requests SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_OPCODES);
	__type(key, __u32);
	__type(value, __u64);
} op_errors SEC(".maps");

/* Sum of send-to-end nanoseconds per opcode (a Prometheus histogram's _sum). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_OPCODES);
	__type(key, __u32);
	__type(value, __u64);
} op_latency_sum SEC(".maps");

/* [opcode * BUCKETS + bucket] */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_OPCODES * BUCKETS);
	__type(key, __u32);
	__type(value, __u64);
} op_latency SEC(".maps");

/* thread id -> switches, for threads of config.daemon_tgid */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct switches);
} thread_switches SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, MAX_SYSCALLS);
	__type(key, __u32);
	__type(value, __u64);
} syscalls SEC(".maps");

/* 0: ends without a matching send (sent before we attached, or pending full) */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost SEC(".maps");

/* Tracepoint records, after the 8-byte common header. */
struct fuse_request_send_args {
	__u64 common;
	__u32 connection;
	__u32 pad;
	__u64 unique;
	__u32 opcode;
	__u32 len;
};

struct fuse_request_end_args {
	__u64 common;
	__u32 connection;
	__u32 pad;
	__u64 unique;
	__u32 len;
	__s32 error;
};

struct sched_switch_args {
	__u64 common;
	char prev_comm[16];
	__s32 prev_pid;
	__s32 prev_prio;
	__s64 prev_state;
	char next_comm[16];
	__s32 next_pid;
	__s32 next_prio;
};

struct sys_enter_args {
	__u64 common;
	__s64 id;
	__u64 args[6];
};

static __always_inline void add(void *map, __u32 key, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(map, &key);
	if (v)
		__sync_fetch_and_add(v, n);
}

static __always_inline __u32 log2_u64(__u64 v)
{
	__u32 r = 0;
	if (v >> 32) { v >>= 32; r += 32; }
	if (v >> 16) { v >>= 16; r += 16; }
	if (v >> 8) { v >>= 8; r += 8; }
	if (v >> 4) { v >>= 4; r += 4; }
	if (v >> 2) { v >>= 2; r += 2; }
	if (v >> 1) { r += 1; }
	return r;
}

static __always_inline struct config *get_config(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&config, &zero);
}

/* Whether a request of `connection` is ours. Until the loader knows the
 * connection (mount(2) sends INIT before it returns), the first request the
 * daemon itself sends (that INIT, from its mount(2)) names it. */
static __always_inline int ours(struct config *cfg, __u32 connection)
{
	if (cfg->connection == connection)
		return 1;
	if (cfg->connection == 0 && cfg->daemon_tgid != 0 &&
	    (bpf_get_current_pid_tgid() >> 32) == cfg->daemon_tgid) {
		cfg->connection = connection;
		return 1;
	}
	return 0;
}

SEC("tracepoint/fuse/fuse_request_send")
int fuse_request_send(struct fuse_request_send_args *ctx)
{
	struct config *cfg = get_config();
	if (!cfg || !ours(cfg, ctx->connection))
		return 0;
	__u32 op = ctx->opcode < MAX_OPCODES ? ctx->opcode : MAX_OPCODES - 1;
	add(&op_requests, op, 1);
	struct pending p = { .start_ns = bpf_ktime_get_ns(), .opcode = op };
	__u64 unique = ctx->unique;
	bpf_map_update_elem(&pending, &unique, &p, BPF_ANY);
	return 0;
}

SEC("tracepoint/fuse/fuse_request_end")
int fuse_request_end(struct fuse_request_end_args *ctx)
{
	struct config *cfg = get_config();
	if (!cfg || cfg->connection != ctx->connection)
		return 0;
	__u64 unique = ctx->unique;
	struct pending *p = bpf_map_lookup_elem(&pending, &unique);
	if (!p) {
		add(&lost, 0, 1);
		return 0;
	}
	__u64 delta = bpf_ktime_get_ns() - p->start_ns;
	__u32 op = p->opcode;
	bpf_map_delete_elem(&pending, &unique);
	if (op >= MAX_OPCODES)
		return 0;
	if (ctx->error != 0)
		add(&op_errors, op, 1);
	add(&op_latency_sum, op, delta);
	__u32 bucket = log2_u64(delta);
	if (bucket >= BUCKETS)
		bucket = BUCKETS - 1;
	add(&op_latency, op * BUCKETS + bucket, 1);
	return 0;
}

/* sched_switch runs on the CPU of the outgoing task: `current` is prev. */
SEC("tracepoint/sched/sched_switch")
int sched_switch(struct sched_switch_args *ctx)
{
	struct config *cfg = get_config();
	if (!cfg || cfg->daemon_tgid == 0)
		return 0;
	__u64 id = bpf_get_current_pid_tgid();
	if ((id >> 32) != cfg->daemon_tgid)
		return 0;
	__u32 tid = (__u32)id;
	struct switches *s = bpf_map_lookup_elem(&thread_switches, &tid);
	if (!s) {
		struct switches zero = {};
		bpf_map_update_elem(&thread_switches, &tid, &zero, BPF_NOEXIST);
		s = bpf_map_lookup_elem(&thread_switches, &tid);
		if (!s)
			return 0;
	}
	/* prev_state 0 is TASK_RUNNING: preempted, not blocked. */
	if (ctx->prev_state == 0)
		__sync_fetch_and_add(&s->involuntary, 1);
	else
		__sync_fetch_and_add(&s->voluntary, 1);
	return 0;
}

SEC("tracepoint/raw_syscalls/sys_enter")
int sys_enter(struct sys_enter_args *ctx)
{
	struct config *cfg = get_config();
	if (!cfg || cfg->syscall_tgid == 0)
		return 0;
	/* 0xffffffff: every process of the machine (the bench's counted run). */
	if (cfg->syscall_tgid != 0xffffffff && (bpf_get_current_pid_tgid() >> 32) != cfg->syscall_tgid)
		return 0;
	if (ctx->id < 0 || ctx->id >= MAX_SYSCALLS)
		return 0;
	add(&syscalls, (__u32)ctx->id, 1);
	return 0;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
