/*
 * A 512-byte x86 boot sector that counts in RAM and prints to COM1.
 *
 * It prints "BOOT" once, then forever: increments the 32-bit counter at physical
 * address 0x7e00, prints "n=<counter> tag=<word at 0x7e04>" (hex) and busy-waits.
 * Both words are read from RAM on every line, so a value written into the guest's
 * memory from outside (the RAM memfd, while no QEMU runs) shows up on the next line;
 * a guest that boots again prints BOOT and starts from 1. No interrupts, no BIOS
 * calls after boot: all its state is the CPU, RAM and COM1.
 *
 * Build: see guest/build.sh (GNU as --32, ld -m elf_i386 -Ttext 0x7c00 --oformat binary).
 */
        .code16
        .intel_syntax noprefix

        .equ COM1, 0x3f8
        .equ COUNTER, 0x7e00
        .equ TAG, 0x7e04
        .equ DELAY, 0x02800000          /* busy-wait iterations between lines */

        .globl _start
_start:
        cli
        xor ax, ax
        mov ds, ax
        mov es, ax
        mov ss, ax
        mov sp, 0x7c00
        cld
        mov dword ptr [COUNTER], 0
        mov dword ptr [TAG], 0
        mov si, offset boot_msg
        call puts

next:
        inc dword ptr [COUNTER]
        mov si, offset n_msg
        call puts
        mov eax, dword ptr [COUNTER]
        call puthex
        mov si, offset tag_msg
        call puts
        mov eax, dword ptr [TAG]
        call puthex
        mov si, offset crlf
        call puts
        mov ecx, DELAY
wait:
        dec ecx
        jnz wait
        jmp next

/* puts: print the NUL-terminated string at ds:si */
puts:
        lodsb
        test al, al
        jz 1f
        call putc
        jmp puts
1:      ret

/* puthex: print eax as 8 hex digits */
puthex:
        mov cx, 8
1:      rol eax, 4
        mov ebx, eax
        and al, 0x0f
        add al, '0'
        cmp al, '9'
        jbe 2f
        add al, 'a' - '9' - 1
2:      call putc
        mov eax, ebx
        loop 1b
        ret

/* putc: send al to COM1 once its transmitter is empty (clobbers dx) */
putc:
        mov ah, al
        mov dx, COM1 + 5
1:      in al, dx
        test al, 0x20
        jz 1b
        mov al, ah
        mov dx, COM1
        out dx, al
        ret

boot_msg: .asciz "BOOT\r\n"
n_msg:    .asciz "n="
tag_msg:  .asciz " tag="
crlf:     .asciz "\r\n"

        .org 510
        .word 0xaa55
