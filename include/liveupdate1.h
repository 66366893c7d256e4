/* liveupdate1.h: the org.liveupdate1 D-Bus contract for C clients (sd-bus).
 *
 * Names, the signature of each member, and an sd_bus_error_map that turns every
 * org.liveupdate1.Error.* into an errno (register it with sd_bus_error_add_map()).
 * Generated from liveupdated/contract.py and dbus/org.liveupdate1.*.xml;
 * tests/test_header.py keeps it equal to them. Session object paths:
 * sd_bus_path_encode(LIVEUPDATE1_SESSION_PREFIX_PATH, name, &path) gives the daemon's
 * path (a leading digit is escaped too). examples/vmm.c uses it all.
 */
#ifndef LIVEUPDATE1_H
#define LIVEUPDATE1_H

#include <errno.h>
#include <systemd/sd-bus.h>

#define LIVEUPDATE1_BUS_NAME "org.liveupdate1"
#define LIVEUPDATE1_MANAGER_PATH "/org/liveupdate1"
#define LIVEUPDATE1_SESSION_PREFIX_PATH "/org/liveupdate1/session"
#define LIVEUPDATE1_MANAGER_INTERFACE "org.liveupdate1.Manager"
#define LIVEUPDATE1_SESSION_INTERFACE "org.liveupdate1.Session"

/* Each method: its input and output signatures, as sd_bus_call_method() takes them. */
#define LIVEUPDATE1_MANAGER_CREATE_SESSION_IN "s"
#define LIVEUPDATE1_MANAGER_CREATE_SESSION_OUT "o"
#define LIVEUPDATE1_MANAGER_RETRIEVE_SESSION_IN "s"
#define LIVEUPDATE1_MANAGER_RETRIEVE_SESSION_OUT "o"
#define LIVEUPDATE1_MANAGER_LIST_SESSIONS_IN ""
#define LIVEUPDATE1_MANAGER_LIST_SESSIONS_OUT "a(sousu)"
#define LIVEUPDATE1_MANAGER_PREPARE_IN ""
#define LIVEUPDATE1_MANAGER_PREPARE_OUT ""
#define LIVEUPDATE1_MANAGER_FREEZE_IN ""
#define LIVEUPDATE1_MANAGER_FREEZE_OUT ""
#define LIVEUPDATE1_MANAGER_CANCEL_IN ""
#define LIVEUPDATE1_MANAGER_CANCEL_OUT ""
#define LIVEUPDATE1_MANAGER_REBOOT_IN ""
#define LIVEUPDATE1_MANAGER_REBOOT_OUT ""
#define LIVEUPDATE1_MANAGER_FINISH_IN ""
#define LIVEUPDATE1_MANAGER_FINISH_OUT ""
#define LIVEUPDATE1_MANAGER_DROP_SESSION_IN "ss"
#define LIVEUPDATE1_MANAGER_DROP_SESSION_OUT ""
#define LIVEUPDATE1_MANAGER_LIST_QUARANTINED_IN ""
#define LIVEUPDATE1_MANAGER_LIST_QUARANTINED_OUT "a(sssts)"
#define LIVEUPDATE1_MANAGER_RETRIEVE_QUARANTINED_IN "s"
#define LIVEUPDATE1_MANAGER_RETRIEVE_QUARANTINED_OUT "h"
#define LIVEUPDATE1_MANAGER_GET_HISTORY_IN ""
#define LIVEUPDATE1_MANAGER_GET_HISTORY_OUT "aa{sv}"
#define LIVEUPDATE1_MANAGER_CHECK_IN ""
#define LIVEUPDATE1_MANAGER_CHECK_OUT "a(sss)"
#define LIVEUPDATE1_MANAGER_RELEASE_QUARANTINED_IN "s"
#define LIVEUPDATE1_MANAGER_RELEASE_QUARANTINED_OUT ""
#define LIVEUPDATE1_SESSION_PRESERVE_FD_IN "shas"
#define LIVEUPDATE1_SESSION_PRESERVE_FD_OUT ""
#define LIVEUPDATE1_SESSION_PRESERVE_FDS_IN "a(shas)"
#define LIVEUPDATE1_SESSION_PRESERVE_FDS_OUT ""
#define LIVEUPDATE1_SESSION_DELAY_FREEZE_IN "b"
#define LIVEUPDATE1_SESSION_DELAY_FREEZE_OUT ""
#define LIVEUPDATE1_SESSION_READY_FOR_FREEZE_IN ""
#define LIVEUPDATE1_SESSION_READY_FOR_FREEZE_OUT ""
#define LIVEUPDATE1_SESSION_UNPRESERVE_FD_IN "s"
#define LIVEUPDATE1_SESSION_UNPRESERVE_FD_OUT ""
#define LIVEUPDATE1_SESSION_RETRIEVE_FD_IN "s"
#define LIVEUPDATE1_SESSION_RETRIEVE_FD_OUT "h"
#define LIVEUPDATE1_SESSION_RETRIEVE_FDS_IN "as"
#define LIVEUPDATE1_SESSION_RETRIEVE_FDS_OUT "a(sh)"
#define LIVEUPDATE1_SESSION_LIST_FDS_IN ""
#define LIVEUPDATE1_SESSION_LIST_FDS_OUT "a(ssast)"
#define LIVEUPDATE1_SESSION_FD_NAMES_IN ""
#define LIVEUPDATE1_SESSION_FD_NAMES_OUT "a{ss}"
#define LIVEUPDATE1_SESSION_FINISH_IN ""
#define LIVEUPDATE1_SESSION_FINISH_OUT ""
#define LIVEUPDATE1_SESSION_CLOSE_IN ""
#define LIVEUPDATE1_SESSION_CLOSE_OUT ""

#define LIVEUPDATE1_ERROR_INVALID_ARGUMENT "org.liveupdate1.Error.InvalidArgument"
#define LIVEUPDATE1_ERROR_SESSION_EXISTS "org.liveupdate1.Error.SessionExists"
#define LIVEUPDATE1_ERROR_NO_SUCH_SESSION "org.liveupdate1.Error.NoSuchSession"
#define LIVEUPDATE1_ERROR_TOKEN_EXISTS "org.liveupdate1.Error.TokenExists"
#define LIVEUPDATE1_ERROR_NO_SUCH_TOKEN "org.liveupdate1.Error.NoSuchToken"
#define LIVEUPDATE1_ERROR_WRONG_STATE "org.liveupdate1.Error.WrongState"
#define LIVEUPDATE1_ERROR_ACCESS_DENIED "org.liveupdate1.Error.AccessDenied"
#define LIVEUPDATE1_ERROR_UNSUPPORTED_FD "org.liveupdate1.Error.UnsupportedFd"
#define LIVEUPDATE1_ERROR_DEPENDENCY_MISSING "org.liveupdate1.Error.DependencyMissing"
#define LIVEUPDATE1_ERROR_QUOTA_EXCEEDED "org.liveupdate1.Error.QuotaExceeded"
#define LIVEUPDATE1_ERROR_CORRUPTED "org.liveupdate1.Error.Corrupted"
#define LIVEUPDATE1_ERROR_TIMEOUT "org.liveupdate1.Error.Timeout"
#define LIVEUPDATE1_ERROR_STORAGE "org.liveupdate1.Error.Storage"

/* sd_bus_error_add_map(liveupdate1_error_map) once, then sd_bus_call() returns
 * -errno of these instead of -EIO. */
static const sd_bus_error_map liveupdate1_error_map[] = {
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.InvalidArgument", EINVAL),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.SessionExists", EEXIST),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.NoSuchSession", ENOENT),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.TokenExists", EEXIST),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.NoSuchToken", ENOENT),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.WrongState", EBUSY),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.AccessDenied", EACCES),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.UnsupportedFd", EBADFD),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.DependencyMissing", ENOLINK),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.QuotaExceeded", EDQUOT),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.Corrupted", EBADMSG),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.Timeout", ETIMEDOUT),
        SD_BUS_ERROR_MAP("org.liveupdate1.Error.Storage", EIO),
        SD_BUS_ERROR_MAP_END
};

#endif /* LIVEUPDATE1_H */
