"""The kernel's time arithmetic for ksmd: jiffies, msecs_to_jiffies and the timer wheel.

ksmd sleeps `sleep_millisecs` as wait_event_freezable_timeout(..., msecs_to_jiffies(ms)):
schedule_timeout() arms a timer `j` jiffies ahead, and the timer wheel never fires early: it
files the timer in the bucket strictly after its expiry at that level's granularity
(kernel/time/timer.c calc_index), so a sleep of j jiffies armed during jiffy J ends at the
tick that starts jiffy J+j+1 for j < 63, and later (rounded up to 8, 64, ... jiffies) for
longer sleeps. Chain pruning compares jiffies with time_before() against
chain_prune_time + msecs_to_jiffies(stable_node_chains_prune_millisecs).

The model's clock counts nanoseconds from 0, and jiffy n starts at n / hz seconds.
"""

from __future__ import annotations

NSEC_PER_SEC = 1_000_000_000

# kernel/time/timer.c: 64 buckets per level, each level 8 times coarser than the one below.
LVL_CLK_SHIFT = 3
LVL_BITS = 6
LVL_SIZE = 1 << LVL_BITS


def lvl_depth(hz: int) -> int:
    """LVL_DEPTH: 9 levels for HZ > 100, else 8."""
    return 9 if hz > 100 else 8


def lvl_shift(n: int) -> int:
    return n * LVL_CLK_SHIFT


def lvl_start(n: int) -> int:
    """LVL_START(n): the first delta (in jiffies) that goes to level n."""
    return (LVL_SIZE - 1) << ((n - 1) * LVL_CLK_SHIFT)


def msecs_to_jiffies(ms: int, hz: int) -> int:
    """include/linux/jiffies.h msecs_to_jiffies for an unsigned int: rounded up."""
    if ms <= 0:
        return 0
    return (ms * hz + 999) // 1000


def jiffies_at(ns: int, hz: int) -> int:
    """The jiffies value at model time `ns` (jiffy 0 starts at time 0)."""
    return ns * hz // NSEC_PER_SEC


def tick_ns(jiffy: int, hz: int) -> int:
    """Model time (ns) of the tick that starts `jiffy`."""
    return -(-jiffy * NSEC_PER_SEC // hz)


def time_before(a: int, b: int) -> bool:
    """time_before(a, b): a is earlier than b (the model's jiffies never wrap)."""
    return a - b < 0


def bucket_expiry(expires: int, clk: int, hz: int) -> int:
    """calc_wheel_index: the jiffy at which a timer due at `expires`, armed at `clk`, fires."""
    delta = expires - clk
    depth = lvl_depth(hz)
    if delta < 0:
        return clk
    lvl = depth - 1
    for n in range(1, depth):
        if delta < lvl_start(n):
            lvl = n - 1
            break
    else:
        cutoff = lvl_start(depth)
        if delta >= cutoff:  # WHEEL_TIMEOUT_MAX
            expires = clk + cutoff - (1 << lvl_shift(depth - 1))
    return ((expires >> lvl_shift(lvl)) + 1) << lvl_shift(lvl)


def sleep_end_ns(now_ns: int, ms: int, hz: int) -> int:
    """When ksmd's sleep of `ms` milliseconds that starts at `now_ns` ends (model time).

    msecs_to_jiffies(0) is 0: wait_event_timeout() with a zero timeout returns at once.
    """
    j = msecs_to_jiffies(ms, hz)
    if j == 0:
        return now_ns
    clk = jiffies_at(now_ns, hz)
    return tick_ns(bucket_expiry(clk + j, clk, hz), hz)
