#!/bin/sh
# The Debian mirror to debootstrap from or download from: printed on stdout (no trailing
# slash), or one line on stderr and exit 1 when there is none. The project names no
# mirror host of its own; it takes, in this order:
#
#   1. $LIVEUPDATED_DEBIAN_MIRROR (e.g. http://ftp.de.debian.org/debian);
#   2. the host's apt sources: the first URI ending in /debian of an enabled "deb"
#      stanza in /etc/apt/sources.list.d/*.sources (deb822), then of a "deb" line in
#      /etc/apt/sources.list and /etc/apt/sources.list.d/*.list.
#
# Only http, https and file URIs count (what debootstrap and apt-get download take); a
# .../debian-security or third-party repository is never picked. Used by
# guest/sid-root.sh, scripts/kernel/fetch-source.sh and tests/nspawn/rootfs.py.
# APT_ETC overrides /etc/apt (the tests use it).
set -eu
if [ -n "${LIVEUPDATED_DEBIAN_MIRROR:-}" ]; then
    printf '%s\n' "${LIVEUPDATED_DEBIAN_MIRROR%/}"
    exit 0
fi
etc=${APT_ETC:-/etc/apt}

is_mirror='^(https?|file):/.*/debian/?$'

from_deb822() {
    # Paragraph mode: one record per stanza; comment lines are no fields.
    awk -v is_mirror="$is_mirror" '
        BEGIN { RS = ""; FS = "\n" }
        {
            types = ""; uris = ""; enabled = "yes"
            for (i = 1; i <= NF; i++) {
                line = $i
                if (line ~ /^#/) continue
                name = tolower(line); sub(/:.*/, "", name)
                value = line; sub(/^[^:]*:[ \t]*/, "", value)
                if (name == "types") types = value
                else if (name == "uris") uris = value
                else if (name == "enabled") enabled = tolower(value)
            }
            if (enabled == "no" || (" " types " ") !~ /[ \t]deb[ \t]/) next
            n = split(uris, list, /[ \t]+/)
            for (j = 1; j <= n; j++)
                if (list[j] ~ is_mirror) { sub(/\/$/, "", list[j]); print list[j]; exit }
        }' "$@"
}

from_one_line() {
    # deb [options] URI suite components; [options] may hold spaces inside the brackets.
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$@" | awk -v is_mirror="$is_mirror" '
        $1 == "deb" && $2 ~ is_mirror { sub(/\/$/, "", $2); print $2; exit }'
}

found=""
for file in "$etc"/sources.list.d/*.sources; do
    [ -f "$file" ] || continue
    found=$(from_deb822 "$file")
    [ -z "$found" ] || break
done
if [ -z "$found" ]; then
    for file in "$etc"/sources.list "$etc"/sources.list.d/*.list; do
        [ -f "$file" ] || continue
        found=$(from_one_line "$file")
        [ -z "$found" ] || break
    done
fi
if [ -z "$found" ]; then
    echo "debian-mirror: no Debian mirror in $etc/sources.list.d/*.sources or" \
        "$etc/sources.list; set LIVEUPDATED_DEBIAN_MIRROR=URL (a Debian mirror, e.g." \
        "https://MIRROR/debian)" >&2
    exit 1
fi
printf '%s\n' "$found"
