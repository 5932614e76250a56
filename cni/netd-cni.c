/* netd-cni / netd-ipam: the native front of the netd CNI plugin.
 *
 * A runtime execs the plugin for every ADD and DEL; the Python plugin
 * (cni/shim.py) spends ~9 ms of CPU starting an interpreter before it does
 * anything, a Go plugin starts in ~2 ms. This program does the common case
 * itself, in well under a millisecond: ADD, DEL, CHECK, STATUS or GC with a
 * network config on stdin that is plain JSON (ASCII, an object, agentSocket /
 * cniVersion without escapes). It sends the same request the shim sends (the
 * config as it came, the CNI_* variables) plus "reply": "cni"; the agent then
 * answers with the exit status and the exact stdout the shim would print, so
 * this program needs no JSON of its own beyond checking its input.
 *
 * Everything else (VERSION, bad input, any error before the request is sent,
 * an answer it does not understand) goes to the Python plugin, which it
 * executes with the stdin it already read: the Python plugin stays the
 * reference for every answer. After the request is sent, a missing answer is
 * reported as the shim reports it (CNI error 11).
 *
 * Standard C and Linux only (memfd_create); no JSON library. Built by
 * 'netd install-cni' (cni/install.py), which writes netd-cni-config.h next to
 * it: PYTHON (the interpreter of the fallback), FALLBACK (the Python plugin's
 * code, run as 'PYTHON -IS -c FALLBACK NAME') and the error codes this program
 * prints itself, taken from the Python plugin's table (one table for both). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "netd-cni-config.h" /* PYTHON[], FALLBACK[], the error codes (ERR_*) */

#define MAX_ANSWER (64 << 20)
#define MAX_DEPTH 128
#define DEFAULT_SOCKET "/run/netd/agent.sock"
#define LATEST_VERSION "1.1.0"

static const char *plugin = "netd-cni";
static char *input;
static size_t input_len;

/* --- the Python plugin: everything this program does not do itself ---------------- */

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void fallback(void) {
    if (input != NULL) { /* hand over what was read from stdin */
        int fd = memfd_create("netd-cni-stdin", 0);
        if (fd < 0 || write_all(fd, input, input_len) != 0 || lseek(fd, 0, SEEK_SET) != 0 ||
            dup2(fd, 0) != 0) {
            printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s: cannot pass stdin to "
                   "the python plugin: %s\",\"details\":\"\"}\n", LATEST_VERSION,
                   ERR_INTERNAL, plugin, strerror(errno));
            exit(1);
        }
        if (fd != 0) close(fd);
    }
    char *argv[] = {(char *)PYTHON, "-IS", "-c", (char *)FALLBACK, (char *)plugin, NULL};
    execv(PYTHON, argv);
    printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"%s: cannot run %s: %s\","
           "\"details\":\"run netd install-cni again\"}\n", LATEST_VERSION, ERR_INTERNAL,
           plugin, PYTHON, strerror(errno));
    exit(1);
}

/* --- checking the network config: strict JSON, ASCII --------------------------------- */

typedef struct {
    const char *s;
    size_t n;
    int is_string;
    int escaped;
} Field;

typedef struct {
    const char *p, *end;
    int depth;
} Scan;

static Field top_socket, top_version, ipam_socket;

static void skip_ws(Scan *sc) {
    while (sc->p < sc->end && (*sc->p == ' ' || *sc->p == '\t' || *sc->p == '\n' ||
                               *sc->p == '\r'))
        sc->p++;
}

static int hexdigit(char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* a string; its raw content (between the quotes) into *f */
static int scan_string(Scan *sc, Field *f) {
    if (sc->p >= sc->end || *sc->p != '"') return -1;
    const char *start = ++sc->p;
    int escaped = 0;
    while (sc->p < sc->end) {
        unsigned char c = (unsigned char)*sc->p;
        if (c == '"') {
            if (f) {
                f->s = start;
                f->n = (size_t)(sc->p - start);
                f->is_string = 1;
                f->escaped = escaped;
            }
            sc->p++;
            return 0;
        }
        if (c < 0x20 || c >= 0x80) return -1;
        if (c == '\\') {
            escaped = 1;
            if (++sc->p >= sc->end) return -1;
            c = (unsigned char)*sc->p;
            if (c == 'u') {
                if (sc->end - sc->p < 5) return -1;
                for (int i = 1; i <= 4; i++)
                    if (!hexdigit(sc->p[i])) return -1;
                sc->p += 4;
            } else if (!strchr("\"\\/bfnrt", c)) {
                return -1;
            }
        }
        sc->p++;
    }
    return -1;
}

static int digits(Scan *sc) {
    const char *start = sc->p;
    while (sc->p < sc->end && *sc->p >= '0' && *sc->p <= '9') sc->p++;
    return sc->p > start ? 0 : -1;
}

static int scan_number(Scan *sc) {
    if (sc->p < sc->end && *sc->p == '-') sc->p++;
    if (sc->p >= sc->end) return -1;
    if (*sc->p == '0') sc->p++;
    else if (digits(sc) != 0) return -1;
    if (sc->p < sc->end && *sc->p == '.') {
        sc->p++;
        if (digits(sc) != 0) return -1;
    }
    if (sc->p < sc->end && (*sc->p == 'e' || *sc->p == 'E')) {
        sc->p++;
        if (sc->p < sc->end && (*sc->p == '+' || *sc->p == '-')) sc->p++;
        if (digits(sc) != 0) return -1;
    }
    return 0;
}

static int scan_word(Scan *sc, const char *w) {
    size_t n = strlen(w);
    if ((size_t)(sc->end - sc->p) < n || memcmp(sc->p, w, n) != 0) return -1;
    sc->p += n;
    return 0;
}

/* level: 0 the config itself, 1 its "ipam" object, 2 anything else */
static int scan_value(Scan *sc, int level, Field *f);

static int key_is(const Field *k, const char *name) {
    return !k->escaped && k->n == strlen(name) && memcmp(k->s, name, k->n) == 0;
}

static int scan_object(Scan *sc, int level) {
    if (++sc->depth > MAX_DEPTH) return -1;
    sc->p++; /* '{' */
    skip_ws(sc);
    if (sc->p < sc->end && *sc->p == '}') {
        sc->p++;
        sc->depth--;
        return 0;
    }
    for (;;) {
        Field key = {0};
        skip_ws(sc);
        if (scan_string(sc, &key) != 0) return -1;
        if (key.escaped && level < 2) return -1; /* "agent\u0053ocket": leave it to python */
        skip_ws(sc);
        if (sc->p >= sc->end || *sc->p != ':') return -1;
        sc->p++;
        skip_ws(sc);
        Field value = {0};
        int child = 2;
        Field *capture = NULL;
        if (level == 0 && key_is(&key, "agentSocket")) capture = &top_socket;
        else if (level == 0 && key_is(&key, "cniVersion")) capture = &top_version;
        else if (level == 1 && key_is(&key, "agentSocket")) capture = &ipam_socket;
        else if (level == 0 && key_is(&key, "ipam")) {
            child = 1;
            memset(&ipam_socket, 0, sizeof ipam_socket); /* the last "ipam" counts */
        }
        if (scan_value(sc, child, capture ? &value : NULL) != 0) return -1;
        if (capture) *capture = value; /* the last occurrence counts, as in python */
        skip_ws(sc);
        if (sc->p >= sc->end) return -1;
        if (*sc->p == ',') {
            sc->p++;
            continue;
        }
        if (*sc->p != '}') return -1;
        sc->p++;
        sc->depth--;
        return 0;
    }
}

static int scan_array(Scan *sc) {
    if (++sc->depth > MAX_DEPTH) return -1;
    sc->p++; /* '[' */
    skip_ws(sc);
    if (sc->p < sc->end && *sc->p == ']') {
        sc->p++;
        sc->depth--;
        return 0;
    }
    for (;;) {
        skip_ws(sc);
        if (scan_value(sc, 2, NULL) != 0) return -1;
        skip_ws(sc);
        if (sc->p >= sc->end) return -1;
        if (*sc->p == ',') {
            sc->p++;
            continue;
        }
        if (*sc->p != ']') return -1;
        sc->p++;
        sc->depth--;
        return 0;
    }
}

static int scan_value(Scan *sc, int level, Field *f) {
    if (f) memset(f, 0, sizeof *f);
    if (f) f->s = ""; /* present, not a string */
    if (sc->p >= sc->end) return -1;
    switch (*sc->p) {
    case '{': return scan_object(sc, level);
    case '[': return scan_array(sc);
    case '"': return scan_string(sc, f);
    case 't': return scan_word(sc, "true");
    case 'f': return scan_word(sc, "false");
    case 'n': return scan_word(sc, "null");
    default: return scan_number(sc);
    }
}

/* --- the request ---------------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t n, cap;
} Buf;

static void put(Buf *b, const char *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = (b->n + n + 1) * 2;
        char *p = realloc(b->p, cap);
        if (p == NULL) fallback();
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
}

static void puts_(Buf *b, const char *s) { put(b, s, strlen(s)); }

/* a JSON string of an environment value; ASCII only, else python takes over */
static void put_json_string(Buf *b, const char *s) {
    put(b, "\"", 1);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        char esc[8];
        if (c >= 0x80) fallback();
        if (c == '"' || c == '\\') {
            esc[0] = '\\';
            esc[1] = (char)c;
            put(b, esc, 2);
        } else if (c < 0x20) {
            snprintf(esc, sizeof esc, "\\u%04x", c);
            put(b, esc, 6);
        } else {
            put(b, (const char *)&c, 1);
        }
    }
    put(b, "\"", 1);
}

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static const char *version = LATEST_VERSION;
static char version_buf[64];
static const char *socket_path = DEFAULT_SOCKET;
static char path_buf[sizeof(((struct sockaddr_un *)0)->sun_path)];

/* no (usable) answer after the request went out: CNI error 11, as the python plugin says it */
static void unreachable(const char *why, double timeout) {
    char reason[160];
    if (timeout > 0) snprintf(reason, sizeof reason, "no answer within %g s", timeout);
    else snprintf(reason, sizeof reason, "%s", why);
    printf("{\"cniVersion\":\"%s\",\"code\":%d,\"msg\":\"try again later: netd agent not "
           "reachable at %s: %s\",\"details\":\"the netd host agent ('netd agent') serves "
           "this socket\"}\n", version, ERR_TRY_AGAIN_LATER, socket_path, reason);
    exit(1);
}

int main(int argc, char **argv) {
    (void)argc;
    const char *base = argv[0] ? strrchr(argv[0], '/') : NULL;
    base = base ? base + 1 : (argv[0] ? argv[0] : "");
    if (strncmp(base, "netd-ipam", 9) == 0) plugin = "netd-ipam";

    const char *command = getenv("CNI_COMMAND");
    static const char *const forwarded[] = {"ADD", "DEL", "CHECK", "STATUS", "GC", NULL};
    int known = 0;
    for (int i = 0; command && forwarded[i]; i++)
        if (strcmp(command, forwarded[i]) == 0) known = 1;
    if (!known) fallback(); /* VERSION, a missing or unknown command */
    if (isatty(0)) fallback(); /* a person at a terminal: python does not wait for stdin */
    signal(SIGPIPE, SIG_IGN);  /* a closed socket or stdout is an error, not death */

    /* stdin */
    size_t cap = 16384;
    input = malloc(cap);
    if (input == NULL) fallback();
    for (;;) {
        if (input_len > MAX_CONFIG) fallback(); /* python refuses it: code 7 */
        if (input_len == cap) {
            char *p = realloc(input, cap * 2);
            if (p == NULL) fallback();
            input = p;
            cap *= 2;
        }
        ssize_t r = read(0, input + input_len, cap - input_len);
        if (r < 0) {
            if (errno == EINTR) continue;
            fallback();
        }
        if (r == 0) break;
        input_len += (size_t)r;
    }

    /* the config: a strict JSON object, ASCII */
    Scan sc = {input, input + input_len, 0};
    skip_ws(&sc);
    if (sc.p >= sc.end || *sc.p != '{') fallback();
    if (scan_object(&sc, 0) != 0) fallback();
    skip_ws(&sc);
    if (sc.p != sc.end) fallback();
    if (top_version.is_string && !top_version.escaped && top_version.n > 0 &&
        top_version.n < sizeof version_buf) {
        memcpy(version_buf, top_version.s, top_version.n);
        version = version_buf;
    } else if (top_version.s != NULL && (top_version.escaped ||
                                         top_version.n >= sizeof version_buf)) {
        fallback();
    }
    const Field *sock = strcmp(plugin, "netd-ipam") == 0 ? &ipam_socket : &top_socket;
    if (sock->s != NULL) { /* present: a plain, short, non-empty string, else python decides */
        if (!sock->is_string || sock->escaped || sock->n == 0 || sock->n >= sizeof path_buf)
            fallback();
        memcpy(path_buf, sock->s, sock->n);
        socket_path = path_buf;
    }

    Buf req = {0};
    puts_(&req, "{\"plugin\":\"");
    puts_(&req, plugin);
    puts_(&req, "\",\"command\":\"");
    puts_(&req, command);
    puts_(&req, "\",\"reply\":\"cni\",\"env\":{");
    static const char *const env_keys[] = {"CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME",
                                           "CNI_ARGS", "CNI_PATH", NULL};
    int first = 1;
    for (int i = 0; env_keys[i]; i++) {
        const char *v = getenv(env_keys[i]);
        if (v == NULL) continue;
        if (!first) put(&req, ",", 1);
        first = 0;
        put(&req, "\"", 1);
        puts_(&req, env_keys[i]);
        put(&req, "\":", 2);
        put_json_string(&req, v);
    }
    puts_(&req, "},\"config\":");
    size_t config_at = req.n;
    put(&req, input, input_len);
    for (size_t i = config_at; i < req.n; i++) /* one line: JSON whitespace only here */
        if (req.p[i] == '\n' || req.p[i] == '\r') req.p[i] = ' ';
    put(&req, "}\n", 2);

    /* the agent */
    double timeout = strcmp(command, "ADD") == 0 ? 120.0 : 30.0;
    double deadline = now() + timeout;
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) fallback();
    struct timeval tv = {(time_t)timeout, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv); /* bounds connect() too */
    struct sockaddr_un addr;
    memset(&addr, 0, sizeof addr);
    addr.sun_family = AF_UNIX;
    memcpy(addr.sun_path, socket_path, strlen(socket_path));
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) fallback();
    if (write_all(fd, req.p, req.n) != 0) unreachable("connection failed", 0);
    shutdown(fd, SHUT_WR);

    Buf ans = {0};
    char chunk[65536];
    for (;;) {
        double left = deadline - now();
        if (left <= 0) unreachable(NULL, timeout);
        struct pollfd pfd = {fd, POLLIN, 0};
        int ready = poll(&pfd, 1, (int)(left * 1000) + 1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            unreachable("connection failed", 0);
        }
        if (ready == 0) continue;
        ssize_t r = read(fd, chunk, sizeof chunk);
        if (r < 0) {
            if (errno == EINTR) continue;
            unreachable("connection failed", 0);
        }
        if (r == 0) break;
        put(&ans, chunk, (size_t)r);
        if (ans.n > MAX_ANSWER) unreachable("answer too large", 0);
    }
    close(fd);
    /* "<exit status>\n<stdout>"; anything else (a refusal in JSON) goes to python */
    if (ans.n < 2 || (ans.p[0] != '0' && ans.p[0] != '1') || ans.p[1] != '\n') {
        if (ans.n == 0) unreachable("connection closed without an answer", 0);
        fallback();
    }
    if (write_all(1, ans.p + 2, ans.n - 2) != 0) return 1;
    return ans.p[0] - '0';
}
