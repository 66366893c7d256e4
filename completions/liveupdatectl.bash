# bash completion for liveupdatectl(1): its commands and options.
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

    local commands="status list history prepare freeze cancel reboot finish preserve unpreserve retrieve demo"
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
        --requires)
            return
            ;;
    esac

    # The command: the first word that is neither an option nor --bus's value.
    local i command=""
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
            --bus) ((i++)) ;;
            -*) ;;
            *) command=${words[i]}; break ;;
        esac
    done

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
        demo) options="--size --json --help" ;;
    esac
    if [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$options" -- "$cur")
    fi
} && complete -F _liveupdatectl liveupdatectl
