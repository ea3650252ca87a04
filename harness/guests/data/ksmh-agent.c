/*
 * ksmh-agent: the in-guest agent and memory allocator of ksm-harness.
 *
 * Runs as PID 1's successor in a busybox initramfs (the init script execs it). It opens the
 * virtio-serial port named "org.ksmh.agent", writes "ready ..." (the write blocks until the
 * host connects, so the first client always sees it), then answers one request per line:
 *
 *   request:  ID COMMAND ARGS...          ID = [A-Za-z0-9_.-]{1,32}
 *   reply:    ID ok KEY=VALUE...          or   ID err MESSAGE
 *   malformed requests (no valid id, overlong line) get "- err MESSAGE"; nothing hangs.
 *
 * Commands: ping | info | fill NAME SIZE PATTERN | verify NAME | rewrite NAME FRACTION [SEED]
 *           | hold NAME SECONDS | digest NAME | poke NAME OFFSET BYTE | free NAME | poweroff,
 *           and the KSM and scenario-worker commands described before valid_id() below
 * Patterns (deterministic per guest index, read from ksmh.index= on the kernel command line):
 *   byte:V | zero | random:SEED | tail96:SEED | mix:SEED:common=P,zero=Q
 *
 * Memory is anonymous private mmap memory, written page by page, so the host sees it as the
 * guest's RAM pages; identical content across guests is what host KSM merges.
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <signal.h>
#include <sys/reboot.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/*
 * Built with -DKSMH_AGENT_STDIO (tests only: tests/unit/test_agent_protocol_fuzz.py), the agent
 * reads requests on stdin and replies on stdout, and refuses what would be harmful on a host:
 * poweroff only exits, fills are capped at STDIO_FILL_MAX bytes, holds at 0.1 s.
 */
#define STDIO_FILL_MAX (16u << 20)
#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define MAXREG 16
#define LINEMAX 4096
#define MAXARGS 1024
#define REPLYMAX (60 * 1024) /* under the host client's 64 KiB line limit */
#define PORT_NAME "org.ksmh.agent"
#define VERSION "1"

enum kind { P_BYTE, P_ZERO, P_RANDOM, P_TAIL96, P_MIX };

struct pattern {
	enum kind kind;
	unsigned value;     /* byte:V */
	uint64_t seed;      /* random, tail96, mix */
	unsigned common;    /* mix: percent identical across guests */
	unsigned zero;      /* mix: percent zero pages */
};

struct region {
	int used;
	char name[33];
	uint8_t *mem;
	size_t pages;
	struct pattern pat;
	uint32_t *gen;      /* 0: page holds the pattern; g > 0: rewritten in rewrite round g */
	uint32_t rounds;
	uint64_t base_common[WORDS]; /* same in every guest */
	uint64_t base_guest[WORDS];  /* unique to this guest */
	uint64_t base_rewrite[WORDS];
};

static struct region regions[MAXREG];
static unsigned long guest_index;
static int port = -1;

/* splitmix64 finaliser: a cheap, well-mixed hash of a 64-bit key. */
static uint64_t mix64(uint64_t x)
{
	x += 0x9e3779b97f4a7c15ULL;
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
	x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
	return x ^ (x >> 31);
}

static void random_words(uint64_t *dst, size_t n, uint64_t key)
{
	for (size_t i = 0; i < n; i++)
		dst[i] = mix64(key ^ mix64(i + 1));
}

static void logmsg(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("ksmh-agent: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
}

static void write_all(const char *buf, size_t len)
{
	while (len > 0) {
#ifdef KSMH_AGENT_STDIO
		ssize_t n = write(1, buf, len);
#else
		ssize_t n = write(port, buf, len);
#endif
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			logmsg("write failed: %s", strerror(errno));
			return;
		}
		buf += n;
		len -= (size_t)n;
	}
}

static void reply(const char *id, const char *fmt, ...)
{
	static char out[REPLYMAX];
	int off = snprintf(out, sizeof(out), "%s ", id);
	va_list ap;
	va_start(ap, fmt);
	off += vsnprintf(out + off, sizeof(out) - (size_t)off - 2, fmt, ap);
	va_end(ap);
	if (off > (int)sizeof(out) - 2)
		off = (int)sizeof(out) - 2;
	out[off++] = '\n';
	write_all(out, (size_t)off);
}

static int parse_u64(const char *s, uint64_t *out, int base)
{
	char *end;
	if (!*s || *s == '-')
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, base);
	if (errno || *end)
		return -1;
	*out = v;
	return 0;
}

/*
 * SIZE: the harness's one size grammar (harness/units.py), integers only: N, NB, NK or NKiB,
 * NM or NMiB, NG or NGiB, NT or NTiB; binary multiples, unit letters in any case. The decimal
 * spellings KB/MB/GB/TB are refused (they mean powers of 1000 elsewhere). The size must be a
 * positive multiple of a page, at most 1 TiB.
 */
static int parse_size(const char *s, size_t *out)
{
	char *end;
	if (!isdigit((unsigned char)*s))
		return -1;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 10);
	if (errno)
		return -1;
	unsigned long long mul = 1;
	if (*end) {
		switch (toupper((unsigned char)*end)) {
		case 'B': mul = 1; break;
		case 'K': mul = 1ULL << 10; break;
		case 'M': mul = 1ULL << 20; break;
		case 'G': mul = 1ULL << 30; break;
		case 'T': mul = 1ULL << 40; break;
		default: return -1;
		}
		end++;
		if (mul > 1 && *end && strcasecmp(end, "iB"))
			return -1; /* KB, MB, ...: decimal spellings are refused */
		if (mul == 1 && *end)
			return -1;
	}
	if (v == 0 || v > (1ULL << 40) / mul || (v * mul) % PAGE)
		return -1;
	*out = (size_t)(v * mul);
	return 0;
}

static int parse_pattern(const char *s, struct pattern *p, char *err, size_t errlen)
{
	memset(p, 0, sizeof(*p));
	uint64_t v;
	if (!strncmp(s, "byte:", 5)) {
		if (parse_u64(s + 5, &v, 0) || v > 255)
			goto bad;
		p->kind = P_BYTE;
		p->value = (unsigned)v;
	} else if (!strcmp(s, "zero")) {
		p->kind = P_ZERO;
	} else if (!strncmp(s, "random:", 7) || !strncmp(s, "tail96:", 7)) {
		if (parse_u64(s + 7, &p->seed, 0))
			goto bad;
		p->kind = s[0] == 'r' ? P_RANDOM : P_TAIL96;
	} else if (!strncmp(s, "mix:", 4)) {
		char seed[32];
		unsigned c, z;
		int n = 0;
		if (sscanf(s + 4, "%31[0-9xa-fA-F]:common=%u,zero=%u%n", seed, &c, &z, &n) != 3 ||
		    s[4 + n] || parse_u64(seed, &p->seed, 0) || c > 100 || z > 100 - c) /* no wrap */
			goto bad;
		p->kind = P_MIX;
		p->common = c;
		p->zero = z;
	} else {
		goto bad;
	}
	return 0;
bad:
	snprintf(err, errlen, "bad pattern '%s' (byte:V zero random:SEED tail96:SEED "
		 "mix:SEED:common=P,zero=Q)", s);
	return -1;
}

static void prepare_bases(struct region *r)
{
	uint64_t s = r->pat.seed;
	random_words(r->base_common, WORDS, mix64(s ^ 0x636f6d6d6f6eULL));
	random_words(r->base_guest, WORDS, mix64(s ^ mix64(guest_index + 0x1000)));
	random_words(r->base_rewrite, WORDS, mix64(s ^ mix64(guest_index + 0x2000) ^ 0x7265ULL));
}

/* The expected content of page p of region r, written to dst. */
static void expected_page(const struct region *r, size_t p, uint8_t *dst)
{
	uint64_t *w = (uint64_t *)dst;
	if (r->gen[p]) {
		memcpy(dst, r->base_rewrite, PAGE);
		w[0] = p;
		w[1] = r->gen[p];
		return;
	}
	switch (r->pat.kind) {
	case P_BYTE:
		memset(dst, (int)r->pat.value, PAGE);
		return;
	case P_ZERO:
		memset(dst, 0, PAGE);
		return;
	case P_RANDOM: /* tp-qemu: one random page, one word replaced by the page number */
		memcpy(dst, r->base_guest, PAGE);
		w[p % WORDS] = p;
		return;
	case P_TAIL96: /* identical except the last 96 bytes (12 words) */
		memcpy(dst, r->base_common, PAGE - 96);
		random_words(w + WORDS - 12, 12, mix64(r->pat.seed ^ mix64(guest_index)) ^ mix64(p));
		return;
	case P_MIX: {
		unsigned c = (unsigned)(mix64(r->pat.seed ^ mix64(p ^ 0x6d6978ULL)) % 100);
		if (c < r->pat.common) {
			memcpy(dst, r->base_common, PAGE);
			w[p % WORDS] = p;
		} else if (c < r->pat.common + r->pat.zero) {
			memset(dst, 0, PAGE);
		} else {
			memcpy(dst, r->base_guest, PAGE);
			w[p % WORDS] = p;
		}
		return;
	}
	}
}

static struct region *find_region(const char *name)
{
	for (int i = 0; i < MAXREG; i++)
		if (regions[i].used && !strcmp(regions[i].name, name))
			return &regions[i];
	return NULL;
}

static size_t free_region(struct region *r)
{
	size_t pages = r->pages;
	munmap(r->mem, r->pages * PAGE);
	munmap(r->gen, r->pages * sizeof(uint32_t));
	memset(r, 0, sizeof(*r));
	return pages;
}

static long mem_available_kib(void)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[128];
	long kib = -1;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %ld kB", &kib) == 1)
			break;
	fclose(f);
	return kib;
}

static double now_ms(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void cmd_fill(const char *id, int argc, char **argv)
{
	char err[160];
	size_t size;
	struct pattern pat;
	if (argc != 4 || strlen(argv[1]) > 32) {
		reply(id, "err usage: fill NAME SIZE PATTERN");
		return;
	}
	if (parse_size(argv[2], &size)
#ifdef KSMH_AGENT_STDIO
	    || size > STDIO_FILL_MAX
#endif
	) {
		reply(id, "err bad size '%.40s' (N bytes, or N with K/KiB, M/MiB, G/GiB or T/TiB: "
		      "binary; MB etc. are refused; a multiple of %u)", argv[2], PAGE);
		return;
	}
	if (parse_pattern(argv[3], &pat, err, sizeof(err))) {
		reply(id, "err %s", err);
		return;
	}
	/*
	 * Refuse what would OOM the guest: the agent is init, so an OOM would panic it. The region
	 * this fill replaces counts as available (its pages are all resident), but it is freed only
	 * once the fill is accepted: a refused fill leaves it as it was.
	 */
	struct region *r = find_region(argv[1]);
	long avail = mem_available_kib();
	long long reclaim = r ? (long long)(r->pages * (PAGE / 1024)) : 0;
	if (avail >= 0 && (long long)(size / 1024) + 16 * 1024 > avail + reclaim) {
		reply(id, "err %zu bytes requested but only %ld KiB available in the guest", size, avail);
		return;
	}
	if (r)
		free_region(r); /* fill replaces a region of the same name */
	for (r = regions; r < regions + MAXREG && r->used; r++)
		;
	if (r == regions + MAXREG) {
		reply(id, "err too many regions (max %d)", MAXREG);
		return;
	}
	size_t pages = size / PAGE;
	void *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	void *gen = mmap(NULL, pages * sizeof(uint32_t), PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED || gen == MAP_FAILED) {
		int e = errno;
		if (mem != MAP_FAILED)
			munmap(mem, size);
		if (gen != MAP_FAILED)
			munmap(gen, pages * sizeof(uint32_t));
		reply(id, "err mmap %zu bytes: %s", size, strerror(e));
		return;
	}
	double t0 = now_ms();
	r->used = 1;
	snprintf(r->name, sizeof(r->name), "%s", argv[1]);
	r->mem = mem;
	r->gen = gen;
	r->pages = pages;
	r->pat = pat;
	prepare_bases(r);
	for (size_t p = 0; p < pages; p++)
		expected_page(r, p, r->mem + p * PAGE);
	reply(id, "ok region=%s pages=%zu bytes=%zu ms=%.0f", r->name, pages, size, now_ms() - t0);
}

static struct region *region_arg(const char *id, int argc, char **argv, int want, const char *usage)
{
	if (argc != want && !(want < 0 && (argc == -want || argc == -want + 1))) {
		reply(id, "err usage: %s", usage);
		return NULL;
	}
	struct region *r = find_region(argv[1]);
	if (!r)
		reply(id, "err no region '%s'", argv[1]);
	return r;
}

static void cmd_verify(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 2, "verify NAME");
	static uint8_t page[PAGE];
	if (!r)
		return;
	size_t bad_bytes = 0, bad_pages = 0;
	for (size_t p = 0; p < r->pages; p++) {
		const uint8_t *m = r->mem + p * PAGE;
		expected_page(r, p, page);
		if (!memcmp(m, page, PAGE))
			continue;
		bad_pages++;
		for (size_t i = 0; i < PAGE; i++)
			bad_bytes += m[i] != page[i];
	}
	reply(id, "ok mismatched=%zu bad_pages=%zu pages=%zu", bad_bytes, bad_pages, r->pages);
}

static void cmd_rewrite(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, -3, "rewrite NAME FRACTION [SEED]");
	if (!r)
		return;
	char *end;
	double frac = strtod(argv[2], &end);
	uint64_t seed = 0;
	/* Written as !(in range) so that "nan" is refused too. */
	if (*end || !(frac >= 0 && frac <= 1) || (argc == 4 && parse_u64(argv[3], &seed, 0))) {
		reply(id, "err usage: rewrite NAME FRACTION [SEED] (FRACTION in 0..1)");
		return;
	}
	r->rounds++;
	uint64_t threshold = (uint64_t)(frac * 1e6);
	size_t n = 0;
	for (size_t p = 0; p < r->pages; p++) {
		if (mix64(seed ^ mix64(p) ^ ((uint64_t)r->rounds << 40)) % 1000000 >= threshold)
			continue;
		r->gen[p] = r->rounds;
		expected_page(r, p, r->mem + p * PAGE);
		n++;
	}
	reply(id, "ok rewritten=%zu pages=%zu round=%u", n, r->pages, r->rounds);
}

static void cmd_hold(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 3, "hold NAME SECONDS");
	if (!r)
		return;
	char *end;
	double s = strtod(argv[2], &end);
	if (*end || !(s >= 0 && s <= 86400)) { /* !(in range): refuses "nan" */
		reply(id, "err bad SECONDS '%s'", argv[2]);
		return;
	}
#ifdef KSMH_AGENT_STDIO
	if (s > 0.1)
		s = 0.1;
#endif
	/* Holding = keeping the memory mapped and untouched for a while, then answering. */
	struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
	while (nanosleep(&ts, &ts) && errno == EINTR)
		;
	reply(id, "ok region=%s pages=%zu held=%s", r->name, r->pages, argv[2]);
}

/* FNV-1a over the region: lets tests compare contents across guests without reading them. */
static void cmd_digest(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 2, "digest NAME");
	if (!r)
		return;
	uint64_t h = 0xcbf29ce484222325ULL;
	const uint64_t *w = (const uint64_t *)r->mem;
	for (size_t i = 0; i < r->pages * WORDS; i++)
		h = (h ^ w[i]) * 0x100000001b3ULL;
	reply(id, "ok hash=%016llx pages=%zu", (unsigned long long)h, r->pages);
}

/* Corrupt one byte on purpose: how tests prove that verify can fail. */
static void cmd_poke(const char *id, int argc, char **argv)
{
	struct region *r = region_arg(id, argc, argv, 4, "poke NAME OFFSET BYTE");
	uint64_t off, val;
	if (!r)
		return;
	if (parse_u64(argv[2], &off, 0) || off >= r->pages * PAGE || parse_u64(argv[3], &val, 0) ||
	    val > 255) {
		reply(id, "err usage: poke NAME OFFSET BYTE (OFFSET < region size, BYTE 0..255)");
		return;
	}
	r->mem[off] = (uint8_t)val;
	reply(id, "ok region=%s offset=%llu", r->name, (unsigned long long)off);
}

static void cmd_info(const char *id)
{
	char names[MAXREG * 34 + 1] = "";
	size_t total = 0;
	for (int i = 0; i < MAXREG; i++) {
		if (!regions[i].used)
			continue;
		if (names[0])
			strcat(names, ",");
		strcat(names, regions[i].name);
		total += regions[i].pages;
	}
	reply(id, "ok index=%lu version=" VERSION " pagesize=%u mem_available_kib=%ld "
	      "regions=%s region_pages=%zu", guest_index, PAGE, mem_available_kib(),
	      names[0] ? names : "-", total);
}

/*
 * ---- The guest's own KSM and scenario workers (the kernel matrix: harness/kernels) ----
 *
 *   ksmsnap [PID:ADDR:LEN ...]  every /sys/kernel/mm/ksm file as k.NAME=VALUE (advisor_mode:
 *                               the selected word), and per PID its ksm_stat lines as
 *                               pPID.NAME=VALUE plus pPID.anon_huge_kb (AnonHugePages of its
 *                               VMAs inside [ADDR, ADDR+LEN)); pPID.gone=1 for a dead process
 *   ksmset NAME VALUE           write VALUE to /sys/kernel/mm/ksm/NAME; "err errno=N ..."
 *   ksmwait LAST TIMEOUT_MS     poll full_scans every millisecond until it is not LAST, read
 *                               pages_scanned/pages_skipped, write run=0 (which returns once
 *                               the batch in progress ended): full_scans= scanned= skipped=
 *   ksmusers [PID ...]          processes KSM scans or counts (harness.procfs.ksm_user's rule),
 *                               minus the PIDs given: users=PID/COMM/REASON,... with REASON
 *                               ksm_mergeable:yes, ksm_rmap_items:N or VM_MERGEABLE
 *   readfile PATH               data=<the first 32 KiB, %XX-escaped>
 *   writefile PATH VALUE        write VALUE and a newline
 *   wspawn NAME                 start a scenario worker (/sbin/ksmh-worker, built from
 *                               ksmh-worker.c) on two pipes: pid=
 *   w NAME WORDS...             relay one line to the worker: "ok " + the worker's reply line
 *   wpush NAME WORDS... / wsend NAME   the same for a line longer than one request
 *   wfork PARENT CHILD          the worker PARENT forks; its child becomes worker CHILD: pid=
 *   wexit NAME                  the worker exits; answered once its mm is gone (zombie/reaped)
 *   wkill                       SIGKILL every worker's process group and reap them
 */
#define KSM_DIR "/sys/kernel/mm/ksm"
#define MAXWORKERS 64
#define WORKER_TIMEOUT_MS 60000

struct worker {
	int used;
	char name[33];
	pid_t pid;
	pid_t group;  /* the root worker's pid: every worker of one root shares its group */
	int cmd, rep; /* our ends: we write commands to cmd, read replies from rep */
	char *pending;
	size_t plen;
	char rbuf[4096];
	size_t rlen;
};

static struct worker workers[MAXWORKERS];
static unsigned fifo_seq;

static void reap_children(void)
{
	while (waitpid(-1, NULL, WNOHANG) > 0)
		;
}

/* Read a small file into buf (NUL-terminated); returns its length or -1 with errno. */
static ssize_t read_small(const char *path, char *buf, size_t cap)
{
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	size_t len = 0;
	for (;;) {
		ssize_t n = read(fd, buf + len, cap - 1 - len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			break;
		len += (size_t)n;
		if (len == cap - 1)
			break;
	}
	close(fd);
	buf[len] = 0;
	return (ssize_t)len;
}

static int write_text(const char *path, const char *value)
{
	char text[256];
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -1;
	int n = snprintf(text, sizeof(text), "%s\n", value);
	ssize_t w = write(fd, text, (size_t)n);
	int e = errno;
	close(fd);
	errno = e;
	return w == n ? 0 : -1;
}

/* Append to a reply under construction; stops (truncates) at REPLYMAX. */
struct text {
	char buf[REPLYMAX - 256];
	size_t len;
};

static void add(struct text *t, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(t->buf + t->len, sizeof(t->buf) - t->len, fmt, ap);
	va_end(ap);
	if (n > 0)
		t->len = t->len + (size_t)n < sizeof(t->buf) ? t->len + (size_t)n : sizeof(t->buf) - 1;
}

/* %XX-escape everything but printable ASCII other than '%' (the host unquotes it). */
static void add_escaped(struct text *t, const char *s, size_t n)
{
	for (size_t i = 0; i < n && t->len + 4 < sizeof(t->buf); i++) {
		unsigned char c = (unsigned char)s[i];
		if (c > 0x20 && c < 0x7f && c != '%')
			t->buf[t->len++] = (char)c;
		else
			t->len += (size_t)sprintf(t->buf + t->len, "%%%02X", c);
	}
	t->buf[t->len] = 0;
}

static int safe_name(const char *s)
{
	return *s && !strchr(s, '/') && strcmp(s, ".") && strcmp(s, "..");
}

static long long ksm_read_ll(const char *name, int *ok)
{
	char path[128], buf[64];
	snprintf(path, sizeof(path), KSM_DIR "/%s", name);
	*ok = read_small(path, buf, sizeof(buf)) > 0;
	return *ok ? strtoll(buf, NULL, 10) : 0;
}

/* Sum of AnonHugePages (kB) of the VMAs of pid that lie inside [lo, hi). */
static long anon_huge_kb(pid_t pid, unsigned long lo, unsigned long hi)
{
	char path[64], line[512];
	snprintf(path, sizeof(path), "/proc/%d/smaps", (int)pid);
	FILE *f = fopen(path, "r");
	long total = 0, kb;
	int inside = 0;
	if (!f)
		return 0;
	while (fgets(line, sizeof(line), f)) {
		unsigned long a, b;
		if (sscanf(line, "%lx-%lx ", &a, &b) == 2 && strchr(line, '-') < strchr(line, ' '))
			inside = lo <= a && b <= hi;
		else if (inside && sscanf(line, "AnonHugePages: %ld kB", &kb) == 1)
			total += kb;
	}
	fclose(f);
	return total;
}

static void cmd_ksmsnap(const char *id, int argc, char **argv)
{
	static struct text t;
	char path[300], buf[256];
	t.len = 0;
	t.buf[0] = 0;
	add(&t, "ok");
	DIR *d = opendir(KSM_DIR);
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), KSM_DIR "/%s", e->d_name);
		if (read_small(path, buf, sizeof(buf)) < 0)
			continue; /* write-only or unreadable: not a value */
		char *v = buf, *lb = strchr(buf, '['), *rb = lb ? strchr(lb, ']') : NULL;
		if (lb && rb) { /* advisor_mode: "[none] scan-time" -> none */
			*rb = 0;
			v = lb + 1;
		}
		v[strcspn(v, "\n")] = 0;
		add(&t, " k.%s=", e->d_name);
		add_escaped(&t, v, strlen(v));
	}
	if (d)
		closedir(d);
	for (int i = 1; i < argc; i++) {
		unsigned long pid, addr = 0, len = 0;
		if (sscanf(argv[i], "%lu:%lu:%lu", &pid, &addr, &len) < 1) {
			reply(id, "err usage: ksmsnap [PID:ADDR:LEN ...]");
			return;
		}
		snprintf(path, sizeof(path), "/proc/%lu/ksm_stat", pid);
		FILE *f = fopen(path, "r");
		if (!f) {
			add(&t, " p%lu.gone=1", pid);
			continue;
		}
		char line[256], key[64], val[64];
		while (fgets(line, sizeof(line), f)) {
			if (sscanf(line, "%63s %63s", key, val) != 2)
				continue;
			key[strcspn(key, ":")] = 0; /* 6.14+: "ksm_merge_any: yes" */
			add(&t, " p%lu.%s=%s", pid, key, val);
		}
		fclose(f);
		if (len)
			add(&t, " p%lu.anon_huge_kb=%ld", pid, anon_huge_kb((pid_t)pid, addr, addr + len));
	}
	reply(id, "%s", t.buf);
}

static void cmd_ksmset(const char *id, int argc, char **argv)
{
	char path[128];
	if (argc != 3 || !safe_name(argv[1]) || strlen(argv[1]) > 64) {
		reply(id, "err usage: ksmset NAME VALUE");
		return;
	}
	snprintf(path, sizeof(path), KSM_DIR "/%s", argv[1]);
	if (write_text(path, argv[2]))
		reply(id, "err errno=%d %s: %s", errno, argv[1], strerror(errno));
	else
		reply(id, "ok");
}

static void cmd_ksmwait(const char *id, int argc, char **argv)
{
	uint64_t last, timeout_ms;
	int ok;
	if (argc != 3 || parse_u64(argv[1], &last, 10) || parse_u64(argv[2], &timeout_ms, 10)) {
		reply(id, "err usage: ksmwait LAST TIMEOUT_MS");
		return;
	}
	int fd = open(KSM_DIR "/full_scans", O_RDONLY);
	if (fd < 0) {
		reply(id, "err no %s/full_scans: %s", KSM_DIR, strerror(errno));
		return;
	}
	double deadline = now_ms() + (double)timeout_ms;
	long long seen;
	for (;;) {
		char buf[32];
		ssize_t n = pread(fd, buf, sizeof(buf) - 1, 0);
		buf[n > 0 ? n : 0] = 0;
		seen = strtoll(buf, NULL, 10);
		if (n > 0 && (uint64_t)seen != last)
			break;
		if (now_ms() > deadline) {
			close(fd);
			reply(id, "err timeout full_scans=%lld", seen);
			return;
		}
		struct timespec ts = {0, 1000000};
		nanosleep(&ts, NULL);
	}
	close(fd);
	long long scanned = ksm_read_ll("pages_scanned", &ok);
	int has_scanned = ok;
	long long skipped = ksm_read_ll("pages_skipped", &ok);
	int has_skipped = ok;
	if (write_text(KSM_DIR "/run", "0")) {
		reply(id, "err errno=%d run=0: %s", errno, strerror(errno));
		return;
	}
	char s1[32] = "-", s2[32] = "-";
	if (has_scanned)
		snprintf(s1, sizeof(s1), "%lld", scanned);
	if (has_skipped)
		snprintf(s2, sizeof(s2), "%lld", skipped);
	reply(id, "ok full_scans=%lld scanned=%s skipped=%s", seen, s1, s2);
}

static void cmd_ksmusers(const char *id, int argc, char **argv)
{
	static struct text t;
	char path[300], buf[4096], comm[64];
	t.len = 0;
	add(&t, "ok users=");
	int first = 1;
	DIR *d = opendir("/proc");
	struct dirent *e;
	while (d && (e = readdir(d))) {
		if (!isdigit((unsigned char)e->d_name[0]))
			continue;
		long pid = atol(e->d_name);
		int skip = pid == (long)getpid();
		for (int i = 1; i < argc; i++)
			skip |= atol(argv[i]) == pid;
		if (skip)
			continue;
		char reason[64] = "";
		snprintf(path, sizeof(path), "/proc/%ld/ksm_stat", pid);
		if (read_small(path, buf, sizeof(buf)) >= 0) {
			char *m = strstr(buf, "ksm_mergeable");
			char *r = strstr(buf, "ksm_rmap_items ");
			if (m && strstr(m, "yes") && strstr(m, "yes") < m + 20)
				snprintf(reason, sizeof(reason), "ksm_mergeable:yes");
			else if (r && atol(r + 15) > 0)
				snprintf(reason, sizeof(reason), "ksm_rmap_items:%ld", atol(r + 15));
			else if (!m) { /* before 6.14: a VM_MERGEABLE mapping says it */
				snprintf(path, sizeof(path), "/proc/%ld/smaps", pid);
				FILE *f = fopen(path, "r");
				char line[512];
				while (f && fgets(line, sizeof(line), f))
					if (!strncmp(line, "VmFlags:", 8) && strstr(line, " mg"))
						snprintf(reason, sizeof(reason), "VM_MERGEABLE");
				if (f)
					fclose(f);
			}
		}
		if (!reason[0])
			continue;
		snprintf(path, sizeof(path), "/proc/%ld/comm", pid);
		if (read_small(path, comm, sizeof(comm)) < 0)
			continue;
		comm[strcspn(comm, "\n /,")] = 0;
		add(&t, "%s%ld/%s/%s", first ? "" : ",", pid, comm, reason);
		first = 0;
	}
	if (d)
		closedir(d);
	reply(id, "%s", t.buf);
}

static void cmd_readfile(const char *id, int argc, char **argv)
{
	static struct text t;
	static char buf[32 * 1024];
	if (argc != 2) {
		reply(id, "err usage: readfile PATH");
		return;
	}
	ssize_t n = read_small(argv[1], buf, sizeof(buf));
	if (n < 0) {
		reply(id, "err errno=%d %s: %s", errno, argv[1], strerror(errno));
		return;
	}
	t.len = 0;
	add(&t, "ok data=");
	add_escaped(&t, buf, (size_t)n);
	reply(id, "%s", t.buf);
}

static void cmd_writefile(const char *id, int argc, char **argv)
{
	if (argc != 3) {
		reply(id, "err usage: writefile PATH VALUE");
		return;
	}
	if (write_text(argv[1], argv[2]))
		reply(id, "err errno=%d %s: %s", errno, argv[1], strerror(errno));
	else
		reply(id, "ok");
}

static struct worker *find_worker(const char *name)
{
	for (int i = 0; i < MAXWORKERS; i++)
		if (workers[i].used && !strcmp(workers[i].name, name))
			return &workers[i];
	return NULL;
}

static struct worker *new_worker(const char *id, const char *name)
{
	if (strlen(name) > 32 || find_worker(name)) {
		reply(id, "err worker name '%.40s' is taken or too long", name);
		return NULL;
	}
	for (int i = 0; i < MAXWORKERS; i++) {
		if (!workers[i].used) {
			memset(&workers[i], 0, sizeof(workers[i]));
			workers[i].used = 1;
			workers[i].cmd = workers[i].rep = -1;
			snprintf(workers[i].name, sizeof(workers[i].name), "%s", name);
			return &workers[i];
		}
	}
	reply(id, "err too many workers (max %d)", MAXWORKERS);
	return NULL;
}

static void drop_worker(struct worker *w)
{
	if (w->cmd >= 0)
		close(w->cmd);
	if (w->rep >= 0 && w->rep != w->cmd)
		close(w->rep);
	free(w->pending);
	memset(w, 0, sizeof(*w));
}

/* One reply line of worker w into out (NUL-terminated, without newline); -1 on EOF/timeout. */
static int worker_line(struct worker *w, char *out, size_t cap, int timeout_ms, const char **why)
{
	double deadline = now_ms() + timeout_ms;
	for (;;) {
		char *nl = memchr(w->rbuf, '\n', w->rlen);
		if (nl) {
			size_t n = (size_t)(nl - w->rbuf);
			size_t m = n < cap - 1 ? n : cap - 1;
			memcpy(out, w->rbuf, m);
			out[m] = 0;
			memmove(w->rbuf, nl + 1, w->rlen - n - 1);
			w->rlen -= n + 1;
			return 0;
		}
		if (w->rlen == sizeof(w->rbuf)) {
			*why = "reply line too long";
			return -1;
		}
		int left = (int)(deadline - now_ms());
		if (left <= 0) {
			*why = "no answer in time";
			return -1;
		}
		struct pollfd pfd = {.fd = w->rep, .events = POLLIN};
		int rc = poll(&pfd, 1, left < 100 ? left : 100);
		if (rc < 0 && errno != EINTR) {
			*why = "poll failed";
			return -1;
		}
		if (rc <= 0)
			continue;
		ssize_t n = read(w->rep, w->rbuf + w->rlen, sizeof(w->rbuf) - w->rlen);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0) {
			*why = "the worker closed its channel (died?)";
			return -1;
		}
		w->rlen += (size_t)n;
	}
}

static int worker_send(struct worker *w, const char *line, size_t len)
{
	while (len > 0) {
		ssize_t n = write(w->cmd, line, len);
		if (n < 0 && errno == EINTR)
			continue;
		if (n <= 0)
			return -1;
		line += n;
		len -= (size_t)n;
	}
	return 0;
}

/* Send `line` (with its newline) to w and reply to the host with the worker's answer. */
static void worker_request(const char *id, struct worker *w, const char *line, size_t len)
{
	static char answer[4096];
	const char *why = "";
	if (worker_send(w, line, len)) {
		reply(id, "err worker %s: cannot send: %s", w->name, strerror(errno));
		return;
	}
	if (worker_line(w, answer, sizeof(answer), WORKER_TIMEOUT_MS, &why))
		reply(id, "err worker %s (pid %d): %s", w->name, (int)w->pid, why);
	else
		reply(id, "ok %s", answer);
}

static int append_words(struct worker *w, int argc, char **argv, int from)
{
	for (int i = from; i < argc; i++) {
		size_t n = strlen(argv[i]);
		char *p = realloc(w->pending, w->plen + n + 2);
		if (!p)
			return -1;
		w->pending = p;
		if (w->plen)
			w->pending[w->plen++] = ' ';
		memcpy(w->pending + w->plen, argv[i], n);
		w->plen += n;
		w->pending[w->plen] = 0;
	}
	return 0;
}

static void cmd_wspawn(const char *id, int argc, char **argv)
{
	int to[2], from[2];
	if (argc != 2) {
		reply(id, "err usage: wspawn NAME");
		return;
	}
	struct worker *w = new_worker(id, argv[1]);
	if (!w)
		return;
	if (pipe(to) || pipe(from)) {
		reply(id, "err pipe: %s", strerror(errno));
		drop_worker(w);
		return;
	}
	pid_t pid = fork();
	if (pid == 0) {
		setpgid(0, 0); /* its own group, shared with its fork children: wkill ends them all */
		dup2(to[0], 0);
		dup2(from[1], 1);
		for (int fd = 3; fd < 1024; fd++)
			close(fd);
		const char *bin = "/sbin/ksmh-worker";
#ifdef KSMH_AGENT_STDIO
		if (getenv("KSMH_WORKER_BIN")) /* tests run the worker built next to the agent */
			bin = getenv("KSMH_WORKER_BIN");
#endif
		char *const args[] = {(char *)bin, NULL};
		execv(bin, args);
		_exit(127);
	}
	close(to[0]);
	close(from[1]);
	if (pid < 0) {
		reply(id, "err fork: %s", strerror(errno));
		close(to[1]);
		close(from[0]);
		drop_worker(w);
		return;
	}
	setpgid(pid, pid);
	w->pid = w->group = pid;
	w->cmd = to[1];
	w->rep = from[0];
	reply(id, "ok pid=%d", (int)pid);
}

static void cmd_w(const char *id, int argc, char **argv, int push)
{
	struct worker *w = argc >= 2 ? find_worker(argv[1]) : NULL;
	if (!w) {
		reply(id, "err no worker '%.40s'", argc >= 2 ? argv[1] : "");
		return;
	}
	if (append_words(w, argc, argv, 2)) {
		reply(id, "err out of memory");
		return;
	}
	if (push) {
		reply(id, "ok pending=%zu", w->plen);
		return;
	}
	char *line = w->pending;
	size_t len = w->plen;
	w->pending = NULL;
	w->plen = 0;
	if (!line) {
		reply(id, "err nothing to send to worker %s", w->name);
		return;
	}
	line[len] = '\n';
	worker_request(id, w, line, len + 1);
	free(line);
}

/* 1 while /proc/PID exists and is not a zombie (its mm not yet torn down). */
static int alive(pid_t pid)
{
	char path[64], buf[512];
	snprintf(path, sizeof(path), "/proc/%d/stat", (int)pid);
	if (read_small(path, buf, sizeof(buf)) < 0)
		return 0;
	char *rp = strrchr(buf, ')');
	return !(rp && rp[1] == ' ' && strchr("ZXx", rp[2]));
}

static void cmd_wfork(const char *id, int argc, char **argv)
{
	char cmdf[64], repf[64], line[200], answer[256];
	const char *why = "";
	struct worker *parent = argc == 3 ? find_worker(argv[1]) : NULL;
	if (!parent) {
		reply(id, "err usage: wfork PARENT CHILD (PARENT a worker)");
		return;
	}
	struct worker *w = new_worker(id, argv[2]);
	if (!w)
		return;
	fifo_seq++;
	snprintf(cmdf, sizeof(cmdf), "/tmp/ksmh-fork%u.cmd", fifo_seq);
	snprintf(repf, sizeof(repf), "/tmp/ksmh-fork%u.reply", fifo_seq);
	unlink(cmdf);
	unlink(repf);
	if (mkfifo(cmdf, 0600) || mkfifo(repf, 0600)) {
		reply(id, "err mkfifo: %s", strerror(errno));
		drop_worker(w);
		return;
	}
	/* O_RDWR never blocks on a FIFO, so neither side waits for the other to open. */
	w->cmd = open(cmdf, O_RDWR);
	w->rep = open(repf, O_RDWR);
	int n = snprintf(line, sizeof(line), "fork %s %s\n", cmdf, repf);
	int ok = w->cmd >= 0 && w->rep >= 0 && !worker_send(parent, line, (size_t)n) &&
		 !worker_line(parent, answer, sizeof(answer), WORKER_TIMEOUT_MS, &why);
	if (ok && strncmp(answer, "ok ", 3)) {
		why = answer;
		ok = 0;
	}
	if (ok) {
		w->pid = (pid_t)atol(answer + 3);
		w->group = parent->group;
		ok = !worker_line(w, answer, sizeof(answer), WORKER_TIMEOUT_MS, &why);
		if (ok && atol(answer + 3) != (long)w->pid) {
			why = "unexpected greeting";
			ok = 0;
		}
	}
	unlink(cmdf);
	unlink(repf);
	if (!ok) {
		reply(id, "err fork of %s failed: %s", parent->name, why);
		drop_worker(w);
		return;
	}
	reply(id, "ok pid=%d", (int)w->pid);
}

static void cmd_wexit(const char *id, int argc, char **argv)
{
	char answer[256];
	const char *why = "";
	struct worker *w = argc == 2 ? find_worker(argv[1]) : NULL;
	if (!w) {
		reply(id, "err usage: wexit NAME (a worker)");
		return;
	}
	if (worker_send(w, "exit\n", 5) ||
	    worker_line(w, answer, sizeof(answer), WORKER_TIMEOUT_MS, &why)) {
		reply(id, "err worker %s: exit: %s", w->name, why);
		return;
	}
	pid_t pid = w->pid;
	drop_worker(w);
	double deadline = now_ms() + WORKER_TIMEOUT_MS;
	while (alive(pid)) {
		reap_children();
		if (now_ms() > deadline) {
			reply(id, "err worker pid %d did not exit", (int)pid);
			return;
		}
		struct timespec ts = {0, 1000000};
		nanosleep(&ts, NULL);
	}
	reap_children();
	reply(id, "ok pid=%d", (int)pid);
}

static void cmd_wkill(const char *id)
{
	pid_t pids[MAXWORKERS];
	int n = 0;
	for (int i = 0; i < MAXWORKERS; i++) {
		if (!workers[i].used)
			continue;
		if (workers[i].group > 0)
			kill(-workers[i].group, SIGKILL);
		kill(workers[i].pid, SIGKILL);
		pids[n++] = workers[i].pid;
		drop_worker(&workers[i]);
	}
	double deadline = now_ms() + 10000;
	for (int i = 0; i < n; i++)
		while (alive(pids[i]) && now_ms() < deadline) {
			reap_children();
			struct timespec ts = {0, 1000000};
			nanosleep(&ts, NULL);
		}
	reap_children();
	reply(id, "ok killed=%d", n);
}

static int valid_id(const char *s)
{
	size_t n = strlen(s);
	if (n == 0 || n > 32)
		return 0;
	for (; *s; s++)
		if (!isalnum((unsigned char)*s) && !strchr("_.-", *s))
			return 0;
	return 1;
}

static void handle(char *line)
{
	static char *argv[MAXARGS];
	int argc = 0;
	for (char *tok = strtok(line, " \t\r"); tok; tok = strtok(NULL, " \t\r")) {
		if (argc == MAXARGS) {
			reply("-", "err too many arguments");
			return;
		}
		argv[argc++] = tok;
	}
	if (argc == 0)
		return; /* blank lines are ignored, so a bare newline never costs a reply */
	if (!valid_id(argv[0])) {
		reply("-", "err malformed request: id must be [A-Za-z0-9_.-]{1,32}");
		return;
	}
	const char *id = argv[0];
	if (argc < 2) {
		reply(id, "err malformed request: missing command");
		return;
	}
	const char *cmd = argv[1];
	argc--;
	char **args = argv + 1;
	if (!strcmp(cmd, "ping"))
		reply(id, "ok pong");
	else if (!strcmp(cmd, "info"))
		cmd_info(id);
	else if (!strcmp(cmd, "fill"))
		cmd_fill(id, argc, args);
	else if (!strcmp(cmd, "verify"))
		cmd_verify(id, argc, args);
	else if (!strcmp(cmd, "rewrite"))
		cmd_rewrite(id, argc, args);
	else if (!strcmp(cmd, "hold"))
		cmd_hold(id, argc, args);
	else if (!strcmp(cmd, "digest"))
		cmd_digest(id, argc, args);
	else if (!strcmp(cmd, "poke"))
		cmd_poke(id, argc, args);
	else if (!strcmp(cmd, "ksmsnap"))
		cmd_ksmsnap(id, argc, args);
	else if (!strcmp(cmd, "ksmset"))
		cmd_ksmset(id, argc, args);
	else if (!strcmp(cmd, "ksmwait"))
		cmd_ksmwait(id, argc, args);
	else if (!strcmp(cmd, "ksmusers"))
		cmd_ksmusers(id, argc, args);
	else if (!strcmp(cmd, "readfile"))
		cmd_readfile(id, argc, args);
	else if (!strcmp(cmd, "writefile"))
		cmd_writefile(id, argc, args);
	else if (!strcmp(cmd, "wspawn"))
		cmd_wspawn(id, argc, args);
	else if (!strcmp(cmd, "w") || !strcmp(cmd, "wpush"))
		cmd_w(id, argc, args, cmd[1] == 'p');
	else if (!strcmp(cmd, "wsend"))
		cmd_w(id, argc, args, 0);
	else if (!strcmp(cmd, "wfork"))
		cmd_wfork(id, argc, args);
	else if (!strcmp(cmd, "wexit"))
		cmd_wexit(id, argc, args);
	else if (!strcmp(cmd, "wkill"))
		cmd_wkill(id);
	else if (!strcmp(cmd, "free")) {
		struct region *r = region_arg(id, argc, args, 2, "free NAME");
		if (r)
			reply(id, "ok freed_pages=%zu", free_region(r));
	} else if (!strcmp(cmd, "poweroff")) {
		reply(id, "ok poweroff");
#ifdef KSMH_AGENT_STDIO
		exit(0);
#else
		sync();
		reboot(RB_POWER_OFF);
#endif
	} else
		reply(id, "err unknown command '%.40s' (ping info fill verify rewrite hold digest "
		      "poke free poweroff ksmsnap ksmset ksmwait ksmusers readfile writefile wspawn w "
		      "wpush wsend wfork wexit wkill)", cmd);
}

static void read_cmdline(void)
{
	char buf[4096];
	int fd = open("/proc/cmdline", O_RDONLY);
	if (fd < 0)
		return;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return;
	buf[n] = 0;
	char *p = strstr(buf, "ksmh.index=");
	if (p)
		guest_index = strtoul(p + strlen("ksmh.index="), NULL, 10);
}

#ifndef KSMH_AGENT_STDIO
/* Find /dev/vportNpM whose /sys/class/virtio-ports/<dev>/name is PORT_NAME. */
static int open_port(void)
{
	for (int tries = 0; tries < 600; tries++) {
		DIR *d = opendir("/sys/class/virtio-ports");
		struct dirent *e;
		while (d && (e = readdir(d))) {
			char path[300], name[64] = "";
			if (e->d_name[0] == '.')
				continue;
			snprintf(path, sizeof(path), "/sys/class/virtio-ports/%s/name", e->d_name);
			int fd = open(path, O_RDONLY);
			if (fd < 0)
				continue;
			ssize_t n = read(fd, name, sizeof(name) - 1);
			close(fd);
			if (n > 0 && name[n - 1] == '\n')
				name[n - 1] = 0;
			if (strcmp(name, PORT_NAME))
				continue;
			snprintf(path, sizeof(path), "/dev/%s", e->d_name);
			fd = open(path, O_RDWR);
			if (fd >= 0) {
				closedir(d);
				return fd;
			}
		}
		if (d)
			closedir(d);
		usleep(100000);
	}
	return -1;
}
#endif

int main(void)
{
	static char buf[LINEMAX + 1];
	size_t len = 0;
	int discarding = 0;

	setvbuf(stderr, NULL, _IONBF, 0);
	read_cmdline();
#ifdef KSMH_AGENT_STDIO
	port = 0;
#else
	port = open_port();
#endif
	if (port < 0) {
		logmsg("no virtio-serial port named " PORT_NAME "; giving up");
		return 1;
	}
	logmsg("index %lu, port open, saying ready", guest_index);
	reply("ready", "index=%lu version=" VERSION " pagesize=%u", guest_index, PAGE);
	for (;;) {
		struct pollfd pfd = {.fd = port, .events = POLLIN};
		int rc = poll(&pfd, 1, 1000);
		reap_children(); /* PID 1 adopts orphaned fork children of scenario workers */
		if (rc <= 0)
			continue;
		ssize_t n = (pfd.revents & POLLIN) ? read(port, buf + len, LINEMAX - len) : 0;
#ifdef KSMH_AGENT_STDIO
		if (n == 0 && !(pfd.revents & POLLIN))
			exit(0); /* stdin closed: the test is done */
#endif
		if (n <= 0) {
			/*
			 * EOF / POLLHUP: no host connected right now; wait for the next client. Drop
			 * what the last one left unfinished, or it would prefix the next client's
			 * first request and that request would never get its reply.
			 */
			if (n == 0) {
				len = 0;
				discarding = 0;
			}
			usleep(100000);
			continue;
		}
		len += (size_t)n;
		char *start = buf, *nl;
		while ((nl = memchr(start, '\n', len - (size_t)(start - buf)))) {
			*nl = 0;
			if (discarding)
				discarding = 0; /* end of an overlong line, already answered */
			else
				handle(start);
			start = nl + 1;
		}
		len -= (size_t)(start - buf);
		memmove(buf, start, len);
		if (len == LINEMAX) {
			if (!discarding)
				reply("-", "err malformed request: line longer than %d bytes", LINEMAX - 1);
			discarding = 1;
			len = 0;
		}
	}
}
