/*
 * vsockt: the guest-side pieces of the real-guest tests that socat cannot do (socat 1.7.4
 * only opens SOCK_STREAM vsock sockets) or does too slowly under TCG (one process per
 * connection). Built with `cc -static` into the test initramfs by tests/guest/build.sh.
 *
 *   vsockt connect CID PORT        connect(2) once; prints "errno=<name> ms=<elapsed>", exit 0
 *                                  if the connect failed, 1 if it succeeded
 *   vsockt echo-server PORT N SECS accept N stream connections at once (poll loop), echo every
 *                                  byte back, exit 0 once all N were accepted and closed by the
 *                                  peer; prints "listening" when bound, then a summary
 *   vsockt connect-many CID PORT N SECS
 *                                  open N stream connections, all held open at once; on each
 *                                  send "conn <i>\n", shut down writing, read the reply until
 *                                  EOF and check it is "ack <i>\n"
 *   vsockt seqpacket CID PORT SECS SEQPACKET client: sends messages of SEND_SIZES, then
 *                                  receives messages of RECV_SIZES (host test knows both);
 *                                  checks every length and byte
 *   vsockt bench-server BASE SECS  the guest side of the benchmark (tests/src/bench/qemu.rs);
 *                                  prints "listening" once these stream listeners are up and
 *                                  serves one connection at a time until "quit":
 *                                  BASE+1 sink: read a line "<n>\n", then n bytes (or to
 *                                         EOF) checking the bench pattern, reply
 *                                         "bytes=<got> bad=<first bad offset or -1>\n"
 *                                  BASE+2 source: read a line "<n>\n", write n pattern bytes,
 *                                         close
 *                                  BASE+3 echo: every byte back until EOF
 *                                  BASE+4 accept and close at once
 *                                  BASE+0 control, one command line, one reply line:
 *                                         "ping PORT N W": connect to host PORT, W warm-up then
 *                                         N 1-byte round trips, reply "p50_us=.. p99_us=.."
 *                                         "connect PORT N": N sequential connect + close to host
 *                                         PORT, reply "conns=N secs=.."
 *                                         "quit": reply "bye", exit 0
 *
 * Every wait is bounded by SECS (or the kernel's 2 s connect timeout). Output goes to stdout,
 * one line per result; the calling shell turns it into @@ markers.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

/* Keep in sync with SEQ_GUEST_SEND / SEQ_HOST_SEND in tests/tests/guest_qemu.rs. */
static const size_t SEND_SIZES[] = {1, 2, 100, 1000, 4096, 4097, 20000, 65536, 3};
static const size_t RECV_SIZES[] = {5, 3000, 1, 65000, 7};
#define NSEND (sizeof SEND_SIZES / sizeof SEND_SIZES[0])
#define NRECV (sizeof RECV_SIZES / sizeof RECV_SIZES[0])

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int vsock_socket(int type)
{
    int fd = socket(AF_VSOCK, type | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        printf("socket: %s\n", strerror(errno));
        exit(2);
    }
    return fd;
}

static struct sockaddr_vm vm_addr(unsigned cid, unsigned port)
{
    struct sockaddr_vm a;
    memset(&a, 0, sizeof a);
    a.svm_family = AF_VSOCK;
    a.svm_cid = cid;
    a.svm_port = port;
    return a;
}

static const char *errname(int e)
{
    switch (e) {
    case 0: return "none";
    case ECONNRESET: return "ECONNRESET";
    case ECONNREFUSED: return "ECONNREFUSED";
    case ETIMEDOUT: return "ETIMEDOUT";
    case ENETUNREACH: return "ENETUNREACH";
    case EHOSTUNREACH: return "EHOSTUNREACH";
    case EACCES: return "EACCES";
    case EPERM: return "EPERM";
    case EINTR: return "EINTR";
    default: return strerror(e);
    }
}

/* Byte j of message k, the same formula as the host test. */
static unsigned char pat(size_t k, size_t j) { return (unsigned char)(k * 31 + j * 7 + 1); }

static int set_timeouts(int fd, int secs)
{
    struct timeval tv = {.tv_sec = secs, .tv_usec = 0};
    if (setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv) < 0 ||
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv) < 0)
        return -1;
    return 0;
}

static int cmd_connect(unsigned cid, unsigned port)
{
    int fd = vsock_socket(SOCK_STREAM);
    struct sockaddr_vm a = vm_addr(cid, port);
    double t0 = now_ms();
    int r = connect(fd, (struct sockaddr *)&a, sizeof a);
    int e = r < 0 ? errno : 0;
    printf("errno=%s ms=%.0f\n", errname(e), now_ms() - t0);
    close(fd);
    return r < 0 ? 0 : 1;
}

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

#define MAXC 1024

static int cmd_echo_server(unsigned port, int n, int secs)
{
    if (n < 1 || n >= MAXC) {
        printf("bad N\n");
        return 2;
    }
    int l = vsock_socket(SOCK_STREAM);
    struct sockaddr_vm a = vm_addr(VMADDR_CID_ANY, port);
    if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, MAXC) < 0) {
        printf("bind/listen: %s\n", strerror(errno));
        return 2;
    }
    printf("listening\n");
    fflush(stdout);
    struct pollfd p[MAXC + 1];
    int nfds = 1, accepted = 0, closed = 0, maxopen = 0;
    unsigned long long bytes = 0;
    p[0].fd = l;
    p[0].events = POLLIN;
    double deadline = now_ms() + secs * 1e3;
    char buf[65536];
    while (closed < n) {
        int left = (int)(deadline - now_ms());
        if (left <= 0) {
            printf("timeout accepted=%d closed=%d bytes=%llu\n", accepted, closed, bytes);
            return 1;
        }
        int r = poll(p, nfds, left);
        if (r < 0 && errno != EINTR) {
            printf("poll: %s\n", strerror(errno));
            return 1;
        }
        if (r <= 0)
            continue;
        if (p[0].revents & POLLIN && accepted < n) {
            int c = accept4(l, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0) {
                printf("accept: %s\n", strerror(errno));
                return 1;
            }
            set_timeouts(c, secs);
            p[nfds].fd = c;
            p[nfds].events = POLLIN;
            p[nfds].revents = 0;
            nfds++;
            accepted++;
            if (nfds - 1 > maxopen)
                maxopen = nfds - 1;
        }
        for (int i = 1; i < nfds; i++) {
            if (!p[i].revents)
                continue;
            ssize_t m = read(p[i].fd, buf, sizeof buf);
            if (m > 0) {
                if (write_all(p[i].fd, buf, (size_t)m) < 0) {
                    printf("echo write: %s\n", strerror(errno));
                    return 1;
                }
                bytes += (unsigned long long)m;
                continue;
            }
            if (m < 0 && (errno == EINTR || errno == EAGAIN))
                continue;
            if (m < 0) {
                printf("echo read: %s\n", strerror(errno));
                return 1;
            }
            close(p[i].fd);
            p[i] = p[nfds - 1];
            nfds--;
            i--;
            closed++;
        }
        if (accepted >= n)
            p[0].events = 0;
    }
    printf("accepted=%d maxopen=%d bytes=%llu\n", accepted, maxopen, bytes);
    return 0;
}

static int cmd_connect_many(unsigned cid, unsigned port, int n, int secs)
{
    if (n < 1 || n >= MAXC) {
        printf("bad N\n");
        return 2;
    }
    static int fds[MAXC];
    for (int i = 0; i < n; i++) {
        fds[i] = vsock_socket(SOCK_STREAM);
        set_timeouts(fds[i], secs);
        struct sockaddr_vm a = vm_addr(cid, port);
        if (connect(fds[i], (struct sockaddr *)&a, sizeof a) < 0) {
            printf("connect %d: %s\n", i, errname(errno));
            return 1;
        }
        char msg[32];
        int len = snprintf(msg, sizeof msg, "conn %d\n", i);
        if (write_all(fds[i], msg, (size_t)len) < 0 || shutdown(fds[i], SHUT_WR) < 0) {
            printf("send %d: %s\n", i, strerror(errno));
            return 1;
        }
    }
    /* All n are open now; the host answers only after it accepted every one of them. */
    for (int i = 0; i < n; i++) {
        char want[32], got[64];
        int wl = snprintf(want, sizeof want, "ack %d\n", i);
        size_t have = 0;
        for (;;) {
            ssize_t m = read(fds[i], got + have, sizeof got - 1 - have);
            if (m < 0 && errno == EINTR)
                continue;
            if (m < 0) {
                printf("reply %d: %s after %zu bytes\n", i, strerror(errno), have);
                return 1;
            }
            if (m == 0)
                break;
            have += (size_t)m;
            if (have == sizeof got - 1)
                break;
        }
        got[have] = 0;
        if (have != (size_t)wl || memcmp(got, want, (size_t)wl) != 0) {
            printf("reply %d: got %zu bytes \"%.20s\"\n", i, have, got);
            return 1;
        }
        close(fds[i]);
    }
    printf("connections=%d\n", n);
    return 0;
}

static int cmd_seqpacket(unsigned cid, unsigned port, int secs)
{
    int fd = vsock_socket(SOCK_SEQPACKET);
    set_timeouts(fd, secs);
    struct sockaddr_vm a = vm_addr(cid, port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        printf("connect: %s\n", errname(errno));
        return 1;
    }
    static unsigned char buf[1 << 17];
    for (size_t k = 0; k < NSEND; k++) {
        for (size_t j = 0; j < SEND_SIZES[k]; j++)
            buf[j] = pat(k, j);
        ssize_t w = send(fd, buf, SEND_SIZES[k], MSG_NOSIGNAL);
        if (w != (ssize_t)SEND_SIZES[k]) {
            printf("send %zu (%zu bytes): %zd %s\n", k, SEND_SIZES[k], w, strerror(errno));
            return 1;
        }
    }
    for (size_t k = 0; k < NRECV; k++) {
        struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
        struct msghdr mh;
        memset(&mh, 0, sizeof mh);
        mh.msg_iov = &iov;
        mh.msg_iovlen = 1;
        ssize_t m = recvmsg(fd, &mh, 0);
        if (m < 0) {
            printf("recv %zu: %s\n", k, strerror(errno));
            return 1;
        }
        if ((size_t)m != RECV_SIZES[k] || (mh.msg_flags & MSG_TRUNC)) {
            printf("recv %zu: %zd bytes (flags %#x), want %zu\n", k, m, mh.msg_flags,
                   RECV_SIZES[k]);
            return 1;
        }
        for (size_t j = 0; j < RECV_SIZES[k]; j++)
            if (buf[j] != pat(100 + k, j)) {
                printf("recv %zu: byte %zu is %u, want %u\n", k, j, buf[j], pat(100 + k, j));
                return 1;
            }
    }
    /* The host closes after its last message: a SEQPACKET EOF is a 0-byte read. */
    ssize_t m = recv(fd, buf, sizeof buf, 0);
    if (m != 0) {
        printf("expected EOF, got %zd %s\n", m, m < 0 ? strerror(errno) : "");
        return 1;
    }
    printf("sent=%zu received=%zu\n", NSEND, NRECV);
    return 0;
}

/*
 * Benchmark pattern: byte i of a stream is bench_pat[i % BENCH_PERIOD] (a prime period, so
 * it does not line up with any write size). Same formula as tests/src/bench/qemu.rs.
 */
#define BENCH_PERIOD 1048573u
#define BENCH_CHUNK 65536u
static unsigned char bench_pat[BENCH_PERIOD + BENCH_CHUNK];

static void bench_pattern_init(void)
{
    for (uint64_t j = 0; j < BENCH_PERIOD + BENCH_CHUNK; j++) {
        uint64_t i = j % BENCH_PERIOD;
        bench_pat[j] = (unsigned char)(i * 7u + (i >> 11) * 13u + 1u);
    }
}

static int read_line(int fd, char *buf, size_t cap)
{
    size_t n = 0;
    while (n + 1 < cap) {
        ssize_t r = read(fd, buf + n, 1);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        if (buf[n] == '\n')
            break;
        n++;
    }
    buf[n] = 0;
    return (int)n;
}

static void reply(int fd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(int fd, const char *fmt, ...)
{
    char line[256];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0)
        (void)write_all(fd, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
}

static void bench_sink(int c)
{
    static unsigned char buf[BENCH_CHUNK];
    char line[64];
    if (read_line(c, line, sizeof line) < 0)
        return;
    uint64_t want = strtoull(line, NULL, 10), total = 0, off = 0;
    int64_t bad = -1;
    while (total < want) {
        uint64_t left = want - total;
        ssize_t m = read(c, buf, left < sizeof buf ? (size_t)left : sizeof buf);
        if (m < 0 && errno == EINTR)
            continue;
        if (m <= 0)
            break;
        if (bad < 0 && memcmp(buf, bench_pat + off, (size_t)m) != 0) {
            for (ssize_t j = 0; j < m; j++)
                if (buf[j] != bench_pat[off + (size_t)j]) {
                    bad = (int64_t)(total + (uint64_t)j);
                    break;
                }
        }
        total += (uint64_t)m;
        off = (off + (uint64_t)m) % BENCH_PERIOD;
    }
    reply(c, "bytes=%" PRIu64 " bad=%" PRId64 "\n", total, bad);
}

static void bench_source(int c)
{
    char line[64];
    if (read_line(c, line, sizeof line) < 0)
        return;
    uint64_t left = strtoull(line, NULL, 10), off = 0;
    while (left > 0) {
        size_t k = left < BENCH_CHUNK ? (size_t)left : BENCH_CHUNK;
        if (write_all(c, bench_pat + off, k) < 0)
            return;
        left -= k;
        off = (off + k) % BENCH_PERIOD;
    }
}

static void bench_echo(int c)
{
    char buf[4096];
    for (;;) {
        ssize_t m = read(c, buf, sizeof buf);
        if (m < 0 && errno == EINTR)
            continue;
        if (m <= 0 || write_all(c, buf, (size_t)m) < 0)
            return;
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static int host_connect(unsigned port, int secs)
{
    int fd = vsock_socket(SOCK_STREAM);
    set_timeouts(fd, secs);
    struct sockaddr_vm a = vm_addr(VMADDR_CID_HOST, port);
    if (connect(fd, (struct sockaddr *)&a, sizeof a) < 0) {
        close(fd);
        return -1;
    }
    return fd;
}

#define MAX_PINGS 100000

static void bench_ping(int c, unsigned port, int n, int warm, int secs)
{
    static double us[MAX_PINGS];
    if (n < 1 || n > MAX_PINGS || warm < 0) {
        reply(c, "error=bad-count\n");
        return;
    }
    int fd = host_connect(port, secs);
    if (fd < 0) {
        reply(c, "error=connect-%s\n", errname(errno));
        return;
    }
    char b = 'x';
    for (int i = 0; i < warm + n; i++) {
        double t0 = now_ms();
        if (write(fd, &b, 1) != 1 || read(fd, &b, 1) != 1) {
            reply(c, "error=round-trip-%d-%s\n", i, errname(errno));
            close(fd);
            return;
        }
        if (i >= warm)
            us[i - warm] = (now_ms() - t0) * 1e3;
    }
    close(fd);
    qsort(us, (size_t)n, sizeof us[0], cmp_double);
    /* Nearest rank, as tests/src/bench/stats.rs. */
    int r50 = (n * 50 + 99) / 100, r99 = (n * 99 + 99) / 100;
    reply(c, "p50_us=%.1f p99_us=%.1f samples=%d\n", us[r50 > 0 ? r50 - 1 : 0],
          us[r99 > 0 ? r99 - 1 : 0], n);
}

static void bench_connect(int c, unsigned port, int n, int secs)
{
    double t0 = now_ms();
    for (int i = 0; i < n; i++) {
        int fd = host_connect(port, secs);
        if (fd < 0) {
            reply(c, "error=connect-%d-%s\n", i, errname(errno));
            return;
        }
        close(fd);
    }
    reply(c, "conns=%d secs=%.4f\n", n, (now_ms() - t0) / 1e3);
}

/* Returns 1 after "quit". */
static int bench_control(int c, int secs)
{
    char line[128], cmd[16];
    unsigned port = 0;
    int n = 0, warm = 0;
    if (read_line(c, line, sizeof line) < 0)
        return 0;
    if (sscanf(line, "%15s", cmd) != 1) {
        reply(c, "error=empty\n");
        return 0;
    }
    if (!strcmp(cmd, "quit")) {
        reply(c, "bye\n");
        return 1;
    }
    if (!strcmp(cmd, "ping") && sscanf(line, "ping %u %d %d", &port, &n, &warm) == 3)
        bench_ping(c, port, n, warm, secs);
    else if (!strcmp(cmd, "connect") && sscanf(line, "connect %u %d", &port, &n) == 2)
        bench_connect(c, port, n, secs);
    else
        reply(c, "error=unknown-command\n");
    return 0;
}

static int cmd_bench_server(unsigned base, int secs)
{
    bench_pattern_init();
    struct pollfd p[5];
    for (unsigned k = 0; k < 5; k++) {
        int l = vsock_socket(SOCK_STREAM);
        struct sockaddr_vm a = vm_addr(VMADDR_CID_ANY, base + k);
        if (bind(l, (struct sockaddr *)&a, sizeof a) < 0 || listen(l, 128) < 0) {
            printf("bind/listen %u: %s\n", base + k, strerror(errno));
            return 2;
        }
        p[k].fd = l;
        p[k].events = POLLIN;
    }
    printf("listening\n");
    fflush(stdout);
    for (;;) {
        int r = poll(p, 5, -1);
        if (r < 0 && errno != EINTR) {
            printf("poll: %s\n", strerror(errno));
            return 1;
        }
        for (unsigned k = 0; k < 5 && r > 0; k++) {
            if (!(p[k].revents & POLLIN))
                continue;
            int c = accept4(p[k].fd, NULL, NULL, SOCK_CLOEXEC);
            if (c < 0)
                continue;
            set_timeouts(c, secs);
            int quit = 0;
            switch (k) {
            case 0: quit = bench_control(c, secs); break;
            case 1: bench_sink(c); break;
            case 2: bench_source(c); break;
            case 3: bench_echo(c); break;
            default: break;
            }
            close(c);
            if (quit) {
                printf("quit\n");
                return 0;
            }
        }
    }
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 4 && !strcmp(argv[1], "connect"))
        return cmd_connect(atoi(argv[2]), atoi(argv[3]));
    if (argc == 5 && !strcmp(argv[1], "echo-server"))
        return cmd_echo_server(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (argc == 6 && !strcmp(argv[1], "connect-many"))
        return cmd_connect_many(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "seqpacket"))
        return cmd_seqpacket(atoi(argv[2]), atoi(argv[3]), atoi(argv[4]));
    if (argc == 4 && !strcmp(argv[1], "bench-server"))
        return cmd_bench_server(atoi(argv[2]), atoi(argv[3]));
    fprintf(stderr, "usage: see the comment at the top of vsockt.c\n");
    return 2;
}
