/* faultfs: an LD_PRELOAD shim that stands between SQLite and the disk for the crash tests
 * (tests/test_crash.py). It acts only on the outbox's own files: the regular files of the
 * directory FAULTFS_DATA whose names end in ".db" or ".db-wal" (never "-shm", the lock file, logs
 * or sockets). Everything else goes straight to libc.
 *
 *   FAULTFS_DATA=<dir>      the data directory (an absolute, resolved path). Without it the shim
 *                           does nothing.
 *   FAULTFS_SHADOW=<dir>    power loss: right after each successful fsync/fdatasync of a data
 *                           file, and before returning to the caller, its whole content is
 *                           copied to <dir>/<name> (written to <name>.tmp, then renamed). Writes
 *                           to the data files wait while a sync and its copy run, so the copy is
 *                           exactly what that sync made durable. Replacing the data directory
 *                           by the shadow's files gives what a power loss would have left: the
 *                           synced bytes, and none of the others.
 *   FAULTFS_CONTROL=<file>  faults, switched at run time: the file is read at every write and
 *                           sync of a data file (correctness over speed). Its words:
 *                             ENOSPC       write/pwrite/pwrite64 fail with ENOSPC (a full disk:
 *                                          SQLite reports SQLITE_FULL, nothing is written);
 *                             ENOSPC_IF=s  those of them whose data holds the bytes s fail so
 *                                          (a nearly full disk, where some transactions fit and
 *                                          others do not: it picks which);
 *                             EIO_FSYNC    fsync/fdatasync fail with EIO (SQLITE_IOERR_FSYNC:
 *                                          what was written may not be on disk).
 *
 * gcc -shared -fPIC -O2 -o faultfs.so faultfs.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

static ssize_t (*real_write)(int, const void *, size_t);
static ssize_t (*real_pwrite)(int, const void *, size_t, off_t);
static ssize_t (*real_pwrite64)(int, const void *, size_t, off64_t);
static int (*real_ftruncate)(int, off_t);
static int (*real_ftruncate64)(int, off64_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);

static pthread_once_t once = PTHREAD_ONCE_INIT;
/* writes to data files take it shared; a sync and its shadow copy take it exclusive (and are
 * not kept waiting by a stream of writes: writers of the lock go first) */
static pthread_rwlock_t io_lock = PTHREAD_RWLOCK_WRITER_NONRECURSIVE_INITIALIZER_NP;
static const char *data_dir, *shadow_dir, *control;
static size_t data_len;
static char copy_buf[1 << 20]; /* used under the exclusive lock only */

static void *next(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (f == NULL) {
        fprintf(stderr, "faultfs: no %s in libc\n", name);
        abort();
    }
    return f;
}

static void init(void) {
    real_write = next("write");
    real_pwrite = next("pwrite");
    real_pwrite64 = next("pwrite64");
    real_ftruncate = next("ftruncate");
    real_ftruncate64 = next("ftruncate64");
    real_fsync = next("fsync");
    real_fdatasync = next("fdatasync");
    data_dir = getenv("FAULTFS_DATA");
    shadow_dir = getenv("FAULTFS_SHADOW");
    control = getenv("FAULTFS_CONTROL");
    if (data_dir != NULL && *data_dir == '\0') data_dir = NULL;
    if (shadow_dir != NULL && *shadow_dir == '\0') shadow_dir = NULL;
    if (control != NULL && *control == '\0') control = NULL;
    data_len = data_dir ? strlen(data_dir) : 0;
}

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && strcmp(s + n - m, suffix) == 0;
}

/* Is fd one of the outbox's files? Its path goes to path (PATH_MAX bytes). */
static int is_data(int fd, char *path) {
    pthread_once(&once, init);
    if (data_dir == NULL || fd < 0) return 0;
    char link[64];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, PATH_MAX - 1);
    if (n <= 0) return 0;
    path[n] = '\0';
    if ((size_t)n <= data_len + 1 || strncmp(path, data_dir, data_len) != 0 || path[data_len] != '/')
        return 0;
    const char *name = path + data_len + 1;
    if (strchr(name, '/') != NULL) return 0;
    return ends_with(name, ".db") || ends_with(name, ".db-wal");
}

/* The control file's words now, in words (a buffer of 512 bytes); their number. */
static int control_words(char *buf, char **words, int max) {
    if (control == NULL) return 0;
    int fd = open(control, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0;
    ssize_t n = read(fd, buf, 511);
    close(fd);
    if (n <= 0) return 0;
    buf[n] = '\0';
    int count = 0;
    char *save = NULL;
    for (char *w = strtok_r(buf, " \t\r\n", &save); w != NULL && count < max;
         w = strtok_r(NULL, " \t\r\n", &save))
        words[count++] = w;
    return count;
}

/* Does the control file say `mode` now? */
static int fault_on(const char *mode) {
    char buf[512], *words[16];
    int n = control_words(buf, words, 16);
    for (int i = 0; i < n; i++)
        if (strcmp(words[i], mode) == 0) return 1;
    return 0;
}

/* Must a write of data (len bytes; NULL: a truncate) to a data file fail with ENOSPC now? */
static int no_room(const void *data, size_t len) {
    char buf[512], *words[16];
    int n = control_words(buf, words, 16);
    for (int i = 0; i < n; i++) {
        if (strcmp(words[i], "ENOSPC") == 0) return data != NULL;
        if (strncmp(words[i], "ENOSPC_IF=", 10) == 0 && data != NULL) {
            const char *s = words[i] + 10;
            if (*s && memmem(data, len, s, strlen(s)) != NULL) return 1;
        }
    }
    return 0;
}

static void die(const char *what, const char *path) {
    fprintf(stderr, "faultfs: %s %s: %s\n", what, path, strerror(errno));
    abort(); /* the test sees the receiver die before it killed it, and fails */
}

/* Copy the synced file fd (at path) to the shadow directory: <name>.tmp, then rename. */
static void copy_to_shadow(int fd, const char *path) {
    struct stat st;
    if (fstat(fd, &st) != 0) die("fstat", path);
    if (!S_ISREG(st.st_mode)) return;
    const char *name = strrchr(path, '/') + 1;
    char tmp[PATH_MAX], dst[PATH_MAX];
    snprintf(dst, sizeof dst, "%s/%s", shadow_dir, name);
    snprintf(tmp, sizeof tmp, "%s/%s.tmp", shadow_dir, name);
    int out = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (out < 0) die("open", tmp);
    off_t off = 0;
    for (;;) {
        ssize_t n = pread(fd, copy_buf, sizeof copy_buf, off);
        if (n < 0) {
            if (errno == EINTR) continue;
            die("read", path);
        }
        if (n == 0) break;
        for (ssize_t done = 0; done < n;) {
            ssize_t w = real_write(out, copy_buf + done, (size_t)(n - done));
            if (w < 0) {
                if (errno == EINTR) continue;
                die("write", tmp);
            }
            done += w;
        }
        off += n;
    }
    if (close(out) != 0) die("close", tmp);
    if (rename(tmp, dst) != 0) die("rename", dst);
}

/* --- writes -------------------------------------------------------------------------------- */

#define GUARDED_WRITE(call)                                   \
    do {                                                      \
        char path[PATH_MAX];                                  \
        if (!is_data(fd, path)) return call;                  \
        if (no_room(buf, n)) {                                \
            errno = ENOSPC;                                   \
            return -1;                                        \
        }                                                     \
        if (shadow_dir == NULL) return call;                  \
        pthread_rwlock_rdlock(&io_lock);                      \
        __typeof__(call) r = call;                            \
        int saved = errno;                                    \
        pthread_rwlock_unlock(&io_lock);                      \
        errno = saved;                                        \
        return r;                                             \
    } while (0)

ssize_t write(int fd, const void *buf, size_t n) {
    pthread_once(&once, init);
    GUARDED_WRITE(real_write(fd, buf, n));
}

ssize_t pwrite(int fd, const void *buf, size_t n, off_t off) {
    pthread_once(&once, init);
    GUARDED_WRITE(real_pwrite(fd, buf, n, off));
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off64_t off) {
    pthread_once(&once, init);
    GUARDED_WRITE(real_pwrite64(fd, buf, n, off));
}

/* A truncate needs no room (growing a file only sets its size): never faulted, but it waits
 * for a sync's copy like a write does. */
#define GUARDED_TRUNCATE(call)                                \
    do {                                                      \
        char path[PATH_MAX];                                  \
        if (shadow_dir == NULL || !is_data(fd, path)) return call; \
        pthread_rwlock_rdlock(&io_lock);                      \
        int r = call;                                         \
        int saved = errno;                                    \
        pthread_rwlock_unlock(&io_lock);                      \
        errno = saved;                                        \
        return r;                                             \
    } while (0)

int ftruncate(int fd, off_t len) {
    pthread_once(&once, init);
    GUARDED_TRUNCATE(real_ftruncate(fd, len));
}

int ftruncate64(int fd, off64_t len) {
    pthread_once(&once, init);
    GUARDED_TRUNCATE(real_ftruncate64(fd, len));
}

/* --- syncs --------------------------------------------------------------------------------- */

static int synced(int fd, int (*sync)(int)) {
    char path[PATH_MAX];
    if (!is_data(fd, path)) return sync(fd);
    if (fault_on("EIO_FSYNC")) {
        errno = EIO;
        return -1;
    }
    if (shadow_dir == NULL) return sync(fd);
    pthread_rwlock_wrlock(&io_lock);
    int r = sync(fd);
    int saved = errno;
    if (r == 0) copy_to_shadow(fd, path);
    pthread_rwlock_unlock(&io_lock);
    errno = saved;
    return r;
}

int fsync(int fd) {
    pthread_once(&once, init);
    return synced(fd, real_fsync);
}

int fdatasync(int fd) {
    pthread_once(&once, init);
    return synced(fd, real_fdatasync);
}
