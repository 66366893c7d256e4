# bash completion for liveupdatectl(1): its commands and options, and the session names
# and tokens the daemon lists for the caller (liveupdatectl complete-names).
# Installed as /usr/share/bash-completion/completions/liveupdatectl.

_liveupdatectl() {
    local cur prev words cword
    if declare -F _init_completion >/dev/null; then
        _init_completion || return
    else
        cur=${COMP_WORDS[COMP_CWORD]}
        prev=${COMP_WORDS[COMP_CWORD - 1]}
        words=("${COMP_WORDS[@]}")
        cword=$COMP_CWORD
    fi

    local commands="status list history show check update prepare freeze cancel reboot finish preserve unpreserve retrieve drop-session delay-freeze ready-for-freeze quarantine demo"
    local global="--bus --json --help --version"

    case $prev in
        --bus)
            mapfile -t COMPREPLY < <(compgen -W "system session unix:path=" -- "$cur")
            return
            ;;
        --size)
            mapfile -t COMPREPLY < <(compgen -W "256M 1G 4G 16G" -- "$cur")
            return
            ;;
        --requires | --reason | --timeout | --reboot-timeout)
            return
            ;;
        -p | --property)
            mapfile -t COMPREPLY < <(compgen -W "State Backend BootId Version LastBlackoutUSec Name Owner Unit FdCount PreservedBytes" -- "$cur")
            return
            ;;
    esac

    # The command: the first word that is neither an option nor --bus's value.
    local i command="" bus=()
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --bus) bus=(--bus "${words[i + 1]}"); ((i++)) ;;
            -*) ;;
            *) command=${words[i]}; break ;;
        esac
    done
    local at=$i

    if [[ $command == retrieve ]]; then
        # Everything after --exec is the command to run: complete it as a command.
        for ((i = i + 1; i < cword; i++)); do
            if [[ ${words[i]} == --exec ]]; then
                if ((i + 1 == cword)); then
                    mapfile -t COMPREPLY < <(compgen -c -- "$cur")
                else
                    mapfile -t COMPREPLY < <(compgen -f -- "$cur")
                fi
                return
            fi
        done
    fi

    if [[ $command == quarantine && $cur != -* ]]; then
        # The words after the command that are not options: ACTION, SESSION, TOKEN.
        local args=() j
        for ((j = at + 1; j < cword; j++)); do
            [[ ${words[j]} == --bus ]] && { ((j++)); continue; }
            [[ ${words[j]} == -* ]] || args+=("${words[j]}")
        done
        case ${#args[@]} in
            0) mapfile -t COMPREPLY < <(compgen -W "list retrieve release" -- "$cur") ;;
            1) [[ ${args[0]} != list ]] && mapfile -t COMPREPLY < <(compgen -W \
                   "$(liveupdatectl "${bus[@]}" complete-names quarantine 2>/dev/null)" -- "$cur") ;;
        esac
        return
    fi

    case $command in
        preserve | unpreserve | retrieve | show | drop-session | delay-freeze | ready-for-freeze)
            if [[ $cur != -* ]]; then
                local args=() j
                for ((j = at + 1; j < cword; j++)); do
                    case ${words[j]} in
                        --bus | --requires | --reason | -p | --property) ((j++)) ;;
                        -*) ;;
                        *) args+=("${words[j]}") ;;
                    esac
                done
                if ((${#args[@]} == 0)); then
                    mapfile -t COMPREPLY < <(compgen -W \
                        "$(liveupdatectl "${bus[@]}" complete-names sessions 2>/dev/null)" -- "$cur")
                    return
                fi
                if ((${#args[@]} == 1)) && [[ $command == unpreserve || $command == retrieve ]]; then
                    mapfile -t COMPREPLY < <(compgen -W \
                        "$(liveupdatectl "${bus[@]}" complete-names tokens "${args[0]}" 2>/dev/null)" -- "$cur")
                    return
                fi
            fi
            ;;
    esac

    if [[ -z $command ]]; then
        if [[ $cur == -* ]]; then
            mapfile -t COMPREPLY < <(compgen -W "$global" -- "$cur")
        else
            mapfile -t COMPREPLY < <(compgen -W "$commands" -- "$cur")
        fi
        return
    fi

    local options="--bus --json --help"
    case $command in
        preserve) options="$options --requires" ;;
        retrieve) options="$options --exec" ;;
        finish) options="$options --wait --timeout" ;;
        update) options="$options --timeout --reboot-timeout" ;;
        show) options="$options --property --value" ;;
        drop-session) options="$options --reason" ;;
        delay-freeze) options="$options --off" ;;
        quarantine) options="$options --exec" ;;
        demo) options="--size --json --help" ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$options" -- "$cur")
    fi
} && complete -F _liveupdatectl liveupdatectl
