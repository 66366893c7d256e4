/* vmm.c: a VMM's side of liveupdated in C, with sd-bus (as QEMU or Cloud Hypervisor
 * would use it). It hands over a memfd of known content, and after the reboot takes it
 * back and checks that it is the same file with the same bytes.
 *
 *   vmm [--address ADDR] preserve SESSION TOKEN BYTES STATEFILE
 *       CreateSession(SESSION), a memfd of BYTES filled with a pattern,
 *       PreserveFd(TOKEN, memfd, []); writes "st_dev st_ino bytes" to STATEFILE, says
 *       READY=1 to systemd (when run as a Type=notify unit) and keeps its connection
 *       (the session lives with it until Prepare) until SIGTERM.
 *   vmm [--address ADDR] retrieve SESSION TOKEN STATEFILE
 *       RetrieveSession(SESSION), RetrieveFd(TOKEN), Session.Finish(); exit 0 when
 *       the fd is the file STATEFILE names (st_dev and st_ino) and holds the pattern.
 *
 * Without --address it talks to the system bus. Errors of the daemon come back as
 * errnos through include/liveupdate1.h's sd_bus_error_map (without it every
 * org.liveupdate1.Error.* would be -EIO). Exit status: 0 done, 1 a check or a call
 * failed (one line on stderr), 2 usage.
 *
 * Build: cc -Iinclude -o vmm examples/vmm.c $(pkg-config --cflags --libs libsystemd)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <systemd/sd-bus.h>
#include <systemd/sd-daemon.h>

#include "liveupdate1.h"

/* The byte at offset `at`: every page differs, so a copy in the wrong order shows. */
static uint8_t pattern(uint64_t at) {
        return (uint8_t) ((at * 31u) ^ (at >> 12) ^ 0x5a);
}

static int fail(const char *what, int r) {
        fprintf(stderr, "vmm: %s: %s\n", what, strerror(r < 0 ? -r : r));
        return 1;
}

static int fail_call(const char *what, const sd_bus_error *error, int r) {
        if (sd_bus_error_is_set(error))
                fprintf(stderr, "vmm: %s: %s (%s; errno %s)\n", what, error->message,
                        error->name, strerrorname_np(-r) ? strerrorname_np(-r) : "?");
        else
                fprintf(stderr, "vmm: %s: %s\n", what, strerror(-r));
        return 1;
}

static int connect_bus(const char *address, sd_bus **ret) {
        sd_bus *bus = NULL;
        int r;

        if (!address)
                return sd_bus_open_system(ret);
        r = sd_bus_new(&bus);
        if (r < 0)
                return r;
        r = sd_bus_set_address(bus, address);
        if (r >= 0)
                r = sd_bus_set_bus_client(bus, 1);
        if (r >= 0)
                r = sd_bus_negotiate_fds(bus, 1);
        if (r >= 0)
                r = sd_bus_start(bus);
        if (r < 0) {
                sd_bus_unref(bus);
                return r;
        }
        *ret = bus;
        return 0;
}

/* The path the daemon answers must be the one sd_bus_path_encode() computes: a client
 * may compute it without asking (a leading digit is escaped too: "7-vm" -> "_37_2dvm"). */
static int check_path(const char *session, const char *answered) {
        char *computed = NULL;
        int r = sd_bus_path_encode(LIVEUPDATE1_SESSION_PREFIX_PATH, session, &computed);
        if (r < 0)
                return fail("sd_bus_path_encode", r);
        r = strcmp(computed, answered) == 0 ? 0 : 1;
        if (r)
                fprintf(stderr, "vmm: the daemon answered %s, sd_bus_path_encode gives %s\n",
                        answered, computed);
        free(computed);
        return r;
}

static int fill(int fd, uint64_t bytes) {
        uint8_t buf[65536];
        for (uint64_t at = 0; at < bytes;) {
                size_t n = bytes - at < sizeof buf ? (size_t) (bytes - at) : sizeof buf;
                for (size_t i = 0; i < n; i++)
                        buf[i] = pattern(at + i);
                ssize_t written = pwrite(fd, buf, n, (off_t) at);
                if (written <= 0)
                        return written < 0 ? -errno : -EIO;
                at += (uint64_t) written;
        }
        return 0;
}

/* 0 when every byte of the fd is the pattern's; else the first offset that differs + 1. */
static uint64_t first_difference(int fd, uint64_t bytes) {
        uint8_t buf[65536];
        for (uint64_t at = 0; at < bytes;) {
                ssize_t n = pread(fd, buf, sizeof buf, (off_t) at);
                if (n <= 0)
                        return at + 1;
                for (ssize_t i = 0; i < n; i++)
                        if (buf[i] != pattern(at + (uint64_t) i))
                                return at + (uint64_t) i + 1;
                at += (uint64_t) n;
        }
        return 0;
}

static volatile sig_atomic_t stop;
static void on_term(int sig) {
        (void) sig;
        stop = 1;
}

static int preserve(sd_bus *bus, const char *session, const char *token, uint64_t bytes,
                    const char *statefile) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        const char *path;
        struct stat st;
        int r, fd;

        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, LIVEUPDATE1_MANAGER_PATH,
                               LIVEUPDATE1_MANAGER_INTERFACE, "CreateSession", &error, &reply,
                               LIVEUPDATE1_MANAGER_CREATE_SESSION_IN, session);
        if (r < 0)
                return fail_call("CreateSession", &error, r);
        r = sd_bus_message_read(reply, LIVEUPDATE1_MANAGER_CREATE_SESSION_OUT, &path);
        if (r < 0)
                return fail("CreateSession's reply", r);
        if (check_path(session, path))
                return 1;
        char *session_path = strdup(path);
        reply = sd_bus_message_unref(reply);
        if (!session_path)
                return fail("strdup", -ENOMEM);

        /* The error map at work: a second CreateSession is SessionExists, i.e. EEXIST. */
        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, LIVEUPDATE1_MANAGER_PATH,
                               LIVEUPDATE1_MANAGER_INTERFACE, "CreateSession", &error, NULL,
                               LIVEUPDATE1_MANAGER_CREATE_SESSION_IN, session);
        if (r != -EEXIST || !sd_bus_error_has_name(&error, LIVEUPDATE1_ERROR_SESSION_EXISTS)) {
                fprintf(stderr, "vmm: a second CreateSession gave %d (%s), not -EEXIST\n", r,
                        error.name ? error.name : "no error");
                return 1;
        }
        sd_bus_error_free(&error);

        fd = memfd_create("guest-ram", MFD_CLOEXEC);
        if (fd < 0)
                return fail("memfd_create", -errno);
        if (ftruncate(fd, (off_t) bytes) < 0)
                return fail("ftruncate", -errno);
        r = fill(fd, bytes);
        if (r < 0)
                return fail("writing the memfd", r);
        if (fstat(fd, &st) < 0)
                return fail("fstat", -errno);

        /* "shas": the token, the fd, and the tokens it requires (none). */
        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, session_path,
                               LIVEUPDATE1_SESSION_INTERFACE, "PreserveFd", &error, NULL,
                               LIVEUPDATE1_SESSION_PRESERVE_FD_IN, token, fd, 0);
        if (r < 0)
                return fail_call("PreserveFd", &error, r);

        FILE *out = fopen(statefile, "we");
        if (!out)
                return fail(statefile, -errno);
        fprintf(out, "%" PRIu64 " %" PRIu64 " %" PRIu64 "\n", (uint64_t) st.st_dev,
                (uint64_t) st.st_ino, bytes);
        if (fclose(out) != 0)
                return fail(statefile, -errno);
        printf("preserved %s/%s at %s: %" PRIu64 " bytes, inode %" PRIu64 "\n", session, token,
               session_path, bytes, (uint64_t) st.st_ino);
        fflush(stdout);
        free(session_path);

        /* The VM runs on: the connection (and with it the session, until Prepare) stays,
         * and so does the memfd, as a VMM keeps its guest's memory. */
        signal(SIGTERM, on_term);
        signal(SIGINT, on_term);
        sd_notify(0, "READY=1");
        while (!stop) {
                r = sd_bus_process(bus, NULL);
                if (r < 0)
                        break; /* the bus went away (the reboot): nothing left to do */
                if (r == 0 && sd_bus_wait(bus, UINT64_MAX) < 0 && errno != EINTR)
                        break;
        }
        close(fd);
        return 0;
}

static int retrieve(sd_bus *bus, const char *session, const char *token,
                    const char *statefile) {
        sd_bus_error error = SD_BUS_ERROR_NULL;
        sd_bus_message *reply = NULL;
        uint64_t dev, ino, bytes, differs;
        const char *path;
        struct stat st;
        int r, fd, received;

        FILE *in = fopen(statefile, "re");
        if (!in)
                return fail(statefile, -errno);
        r = fscanf(in, "%" SCNu64 " %" SCNu64 " %" SCNu64, &dev, &ino, &bytes);
        fclose(in);
        if (r != 3) {
                fprintf(stderr, "vmm: %s: not \"st_dev st_ino bytes\"\n", statefile);
                return 1;
        }

        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, LIVEUPDATE1_MANAGER_PATH,
                               LIVEUPDATE1_MANAGER_INTERFACE, "RetrieveSession", &error, &reply,
                               LIVEUPDATE1_MANAGER_RETRIEVE_SESSION_IN, session);
        if (r < 0)
                return fail_call("RetrieveSession", &error, r);
        r = sd_bus_message_read(reply, LIVEUPDATE1_MANAGER_RETRIEVE_SESSION_OUT, &path);
        if (r < 0)
                return fail("RetrieveSession's reply", r);
        if (check_path(session, path))
                return 1;
        char *session_path = strdup(path);
        reply = sd_bus_message_unref(reply);
        if (!session_path)
                return fail("strdup", -ENOMEM);

        /* A token that was never preserved: NoSuchToken, i.e. ENOENT through the map. */
        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, session_path,
                               LIVEUPDATE1_SESSION_INTERFACE, "RetrieveFd", &error, NULL,
                               LIVEUPDATE1_SESSION_RETRIEVE_FD_IN, "never-preserved");
        if (r != -ENOENT || !sd_bus_error_has_name(&error, LIVEUPDATE1_ERROR_NO_SUCH_TOKEN)) {
                fprintf(stderr, "vmm: RetrieveFd of an unknown token gave %d (%s), not -ENOENT\n",
                        r, error.name ? error.name : "no error");
                return 1;
        }
        sd_bus_error_free(&error);

        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, session_path,
                               LIVEUPDATE1_SESSION_INTERFACE, "RetrieveFd", &error, &reply,
                               LIVEUPDATE1_SESSION_RETRIEVE_FD_IN, token);
        if (r < 0)
                return fail_call("RetrieveFd", &error, r);
        r = sd_bus_message_read(reply, LIVEUPDATE1_SESSION_RETRIEVE_FD_OUT, &received);
        if (r < 0)
                return fail("RetrieveFd's reply", r);
        /* The message owns the fd it carries: keep a copy of our own. */
        fd = fcntl(received, F_DUPFD_CLOEXEC, 3);
        reply = sd_bus_message_unref(reply);
        if (fd < 0)
                return fail("dup of the retrieved fd", -errno);

        if (fstat(fd, &st) < 0)
                return fail("fstat", -errno);
        if ((uint64_t) st.st_size != bytes) {
                fprintf(stderr, "vmm: %" PRIu64 " bytes, not %" PRIu64 "\n",
                        (uint64_t) st.st_size, bytes);
                return 1;
        }
        differs = first_difference(fd, bytes);
        if (differs) {
                fprintf(stderr, "vmm: the content differs at offset %" PRIu64 "\n", differs - 1);
                return 1;
        }
        /* Checked after the bytes: a backend that copies (the simulated one) hands back
         * the same bytes in another file; the fdstore and kernel backends, the file. */
        if ((uint64_t) st.st_dev != dev || (uint64_t) st.st_ino != ino) {
                fprintf(stderr, "vmm: the retrieved fd is %" PRIu64 ":%" PRIu64
                        ", not the preserved file %" PRIu64 ":%" PRIu64 "\n",
                        (uint64_t) st.st_dev, (uint64_t) st.st_ino, dev, ino);
                return 1;
        }

        /* Every fd of the session is back: the daemon may let the session go. */
        r = sd_bus_call_method(bus, LIVEUPDATE1_BUS_NAME, session_path,
                               LIVEUPDATE1_SESSION_INTERFACE, "Finish", &error, NULL,
                               LIVEUPDATE1_SESSION_FINISH_IN);
        if (r < 0)
                return fail_call("Session.Finish", &error, r);
        printf("retrieved %s/%s at %s: the same inode %" PRIu64 ", %" PRIu64
               " bytes as preserved\n", session, token, session_path, ino, bytes);
        free(session_path);
        close(fd);
        return 0;
}

static int usage(void) {
        fprintf(stderr, "usage: vmm [--address ADDR] preserve SESSION TOKEN BYTES STATEFILE\n"
                        "       vmm [--address ADDR] retrieve SESSION TOKEN STATEFILE\n");
        return 2;
}

int main(int argc, char *argv[]) {
        const char *address = NULL;
        sd_bus *bus = NULL;
        int r, status;

        if (argc > 2 && strcmp(argv[1], "--address") == 0) {
                address = argv[2];
                argc -= 2;
                argv += 2;
        }
        if (argc < 2)
                return usage();
        int preserving = strcmp(argv[1], "preserve") == 0;
        if (!(preserving ? argc == 6 : strcmp(argv[1], "retrieve") == 0 && argc == 5))
                return usage();

        /* Once per process: sd-bus then turns org.liveupdate1.Error.* into errnos. */
        r = sd_bus_error_add_map(liveupdate1_error_map);
        if (r < 0)
                return fail("sd_bus_error_add_map", r);
        r = connect_bus(address, &bus);
        if (r < 0)
                return fail(address ? address : "the system bus", r);

        if (preserving) {
                char *end;
                errno = 0;
                unsigned long long bytes = strtoull(argv[4], &end, 10);
                if (errno || *end || bytes == 0) {
                        sd_bus_flush_close_unref(bus);
                        return usage();
                }
                status = preserve(bus, argv[2], argv[3], bytes, argv[5]);
        } else
                status = retrieve(bus, argv[2], argv[3], argv[4]);
        sd_bus_flush_close_unref(bus);
        return status;
}
