from deer_serve.cli import main

if __name__ == "__main__":
    main()
