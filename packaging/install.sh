#!/usr/bin/env bash
# Install liveupdated system-wide, laid out as a distribution does (see packaging/README.md):
# the code in its own venv under /usr/lib/liveupdated, unit, bus policy, activation file,
# interfaces, tmpfiles and docs under /usr. Run it on the target system or in a chroot of it.
#
#   install.sh [--wheels DIR] [--root DESTDIR] [--python PYTHON] [--enable] [--no-man]
#
# --wheels DIR    install liveupdated and its dependencies from DIR only (no index), as made
#                 by build-wheels.sh; without it pip builds this source tree with the index
# --root DESTDIR  stage the files under DESTDIR (for a package) instead of /: the venv
#                 is relocated so that it runs from /usr/lib/liveupdated; nothing is started
# --python PY     the interpreter the venv is built on (default /usr/bin/python3)
# --enable        systemctl enable --now liveupdated.service afterwards (DESTDIR / only)
# --no-man        no manual pages (build-deb.sh renders them where scdoc is: the host)
#
# On a running system a running daemon is restarted onto the new code (systemctl
# try-restart: the unit's fd store, and so every fd it holds, survives a restart).
set -euo pipefail

src=$(cd "$(dirname "$0")/.." && pwd)
wheels="" destdir="" python=/usr/bin/python3 enable=no man=yes
while (($#)); do
    case $1 in
        --wheels) wheels=$(cd "$2" && pwd); shift 2 ;;
        --root) destdir=${2%/}; shift 2 ;;
        --python) python=$2; shift 2 ;;
        --enable) enable=yes; shift ;;
        --no-man) man=no; shift ;;
        *) echo "usage: $0 [--wheels DIR] [--root DESTDIR] [--python PY] [--enable] [--no-man]" >&2
           exit 2 ;;
    esac
done

prefix=/usr/lib/liveupdated
venv=$destdir$prefix
staging=$destdir/usr/lib/.liveupdated.new

# 1. The venv, built beside the old one and swapped in at the end.
rm -rf "$staging"
mkdir -p "$(dirname "$staging")"
"$python" -m venv --without-pip "$staging"
# pip runs from the wheel the interpreter bundles (Debian: python3-pip-whl), so the venv
# itself carries no pip.
shopt -s nullglob
ensurepip=$("$python" -c 'import ensurepip, os; print(os.path.dirname(ensurepip.__file__))')
pip_wheels=(/usr/share/python-wheels/pip-*.whl "$ensurepip"/_bundled/pip-*.whl)
shopt -u nullglob
if ((${#pip_wheels[@]} == 0)); then echo "install.sh: no bundled pip wheel for $python" >&2; exit 1; fi
pip=("$staging/bin/python" "${pip_wheels[0]}/pip" install --quiet --disable-pip-version-check
     --no-compile)
if [[ -n $wheels ]]; then
    "${pip[@]}" --no-index --find-links "$wheels" liveupdated
else
    "${pip[@]}" "$src"
fi

# No one activates the venv: its scripts name their interpreter.
rm -f "$staging"/bin/activate "$staging"/bin/activate.* "$staging"/bin/Activate.ps1
rmdir "$staging"/include/* "$staging/include" 2>/dev/null || true  # empty
# Relocate: the scripts name the directory the venv was built in.
grep -lrF --null "$staging" "$staging/bin" "$staging/pyvenv.cfg" |
    xargs -0 --no-run-if-empty sed -i "s|${staging//./\\.}|$prefix|g"
if [[ -z $destdir ]]; then
    "$staging/bin/python" -m compileall -q -j0 -s "$staging" -p "$prefix" "$staging/lib" >/dev/null
else
    # A package ships no bytecode (its postinst compiles it); the link to the interpreter
    # is relative, as a package's links within /usr are.
    find "$staging" -depth -type d -name __pycache__ -exec rm -rf {} +
    if [[ $(readlink "$staging/bin/python3") == /usr/bin/python3 ]]; then
        ln -sfn ../../../bin/python3 "$staging/bin/python3"
    fi
fi
rm -rf "$venv.old"
if [[ -e $venv ]]; then mv "$venv" "$venv.old"; fi
mv "$staging" "$venv"
rm -rf "$venv.old"

# 2. Commands, systemd, D-Bus, tmpfiles and docs.
mkdir -p "$destdir/usr/bin" "$destdir/usr/sbin"
ln -sfn ../lib/liveupdated/bin/liveupdatectl "$destdir/usr/bin/liveupdatectl"
ln -sfn ../lib/liveupdated/bin/liveupdated "$destdir/usr/sbin/liveupdated"
ln -sfn ../lib/liveupdated/bin/liveupdated-qemu "$destdir/usr/sbin/liveupdated-qemu"
put() { install -D -m 0644 "$src/$1" "$destdir$2"; }
put units/liveupdated.service /usr/lib/systemd/system/liveupdated.service
put units/liveupdated-qemu@.service /usr/lib/systemd/system/liveupdated-qemu@.service
put units/liveupdated.tmpfiles.conf /usr/lib/tmpfiles.d/liveupdated.conf
# The QEMU adapter's configuration directory: one INSTANCE.conf a VM (liveupdated(8)).
install -d -m 0755 "$destdir/etc/liveupdated/qemu"
put packaging/liveupdated.catalog /usr/lib/systemd/catalog/liveupdated.catalog
put include/liveupdate1.h /usr/include/liveupdate1.h
put dbus/org.liveupdate1.conf /usr/share/dbus-1/system.d/org.liveupdate1.conf
put dbus/org.liveupdate1.service /usr/share/dbus-1/system-services/org.liveupdate1.service
for xml in "$src"/dbus/org.liveupdate1.*.xml; do
    put "dbus/${xml##*/}" "/usr/share/dbus-1/interfaces/${xml##*/}"
done
put polkit/org.liveupdate1.policy /usr/share/polkit-1/actions/org.liveupdate1.policy
put completions/liveupdatectl.bash /usr/share/bash-completion/completions/liveupdatectl
# Manual pages, from their scdoc sources (Debian: scdoc), compressed as Debian ships them.
if [[ $man == no ]]; then
    :
elif command -v scdoc >/dev/null; then
    for page in "$src"/man/*.scd; do
        name=${page##*/}; name=${name%.scd}; section=${name##*.}
        mkdir -p "$destdir/usr/share/man/man$section"
        scdoc <"$page" | gzip -9n >"$destdir/usr/share/man/man$section/$name.gz"
        chmod 0644 "$destdir/usr/share/man/man$section/$name.gz"
    done
else
    echo "install.sh: scdoc not found, manual pages not installed (apt install scdoc)" >&2
fi
put README.md /usr/share/doc/liveupdated/README.md
for doc in "$src"/docs/*.md; do
    put "docs/${doc##*/}" "/usr/share/doc/liveupdated/${doc##*/}"
done

# 3. Tell the running system, if this is it.
if [[ -z $destdir && -d /run/systemd/system ]]; then
    systemd-tmpfiles --create liveupdated.conf
    journalctl --update-catalog 2>/dev/null || true
    systemctl daemon-reload
    # The bus must know the name policy before the daemon asks for the name.
    if systemctl --quiet is-active dbus.service; then systemctl reload dbus.service; fi
    systemctl try-restart liveupdated.service
    if [[ $enable == yes ]]; then systemctl enable --now liveupdated.service; fi
fi
