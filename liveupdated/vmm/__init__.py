"""The QEMU adapter: makes an unmodified QEMU VM live-updatable through liveupdated.

It owns the guest-RAM memfd, runs QEMU on it (`memory-backend-file` on
/proc/self/fd/N, share=on), joins liveupdated as the VM's session and follows the update:
on FreezeStarted it stops the guest and saves the device state (migration mode
cpr-reboot with x-ignore-shared: RAM is not copied) into a second memfd liveupdated
already holds; after the kexec it retrieves both, starts QEMU with `-incoming defer`,
loads the state and continues the guest. `python -m liveupdated.vmm --help`.
"""
